"""Benchmarks: scripts that measure and print ratios taken in one run (``python bench/<name>.py``)."""
