"""What a command line shows: this project's own log messages, and not the warnings that do not apply to it."""

from __future__ import annotations

import logging
import warnings

# This project's top-level packages: their loggers (``logging.getLogger(__name__)``) are the ones shown.
PACKAGES = ("callbacks", "core", "datamodules", "lightning_modules", "metrics", "scripts", "sd")

# Warnings of the libraries that every run printed and that say nothing about it (regular expressions of their start).
NOT_APPLICABLE = (
    # The frozen parts (VAE, text encoders, the base weights under the adapters) are in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Logging counts optimizer steps across epochs; a few photos make epochs shorter than the interval, harmlessly.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Lightning's own code under torch 2.14 (lightning/pytorch/utilities/_pytree.py), nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
LIGHTNING_ADVERT = "💡 Tip:"  # Lightning's suggestion to install its cloud logger, printed at every start

_set_up = False


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_ADVERT)


def set_up_console() -> None:
    """For a command line: print this project's INFO messages and above to stderr as plain lines, as Lightning prints
    its own (which photos have captions or masks, the buckets, the caches built or reused, the class images being
    generated; Python alone shows warnings only), and leave out the warnings in ``NOT_APPLICABLE`` and Lightning's
    advert. Once per process; the loggers still pass their records on (pytest's caplog sees them)."""
    global _set_up
    if _set_up:
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    for message in NOT_APPLICABLE:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
    _set_up = True
