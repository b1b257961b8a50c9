"""What a command line shows of this project's own log messages."""

from __future__ import annotations

import logging

# This project's top-level packages: their loggers (``logging.getLogger(__name__)``) are the ones shown.
PACKAGES = ("callbacks", "core", "datamodules", "lightning_modules", "metrics", "scripts", "sd")

_shown = False


def show_info_messages() -> None:
    """Print this project's INFO messages and above to stderr as plain lines, as Lightning prints its own: which photos
    have captions or masks, the buckets, the caches built or reused, the class images being generated. Without this,
    Python shows only warnings. Once per process; the loggers still pass their records on (pytest's caplog sees them)."""
    global _shown
    if _shown:
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    _shown = True
