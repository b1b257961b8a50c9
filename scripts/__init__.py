"""Command-line tools beside train.py, run from the repository root: ``python -m scripts.<name>``."""
