"""Rendering: a pipeline around the live modules, seeded sampling, ControlNet, PNG metadata."""
