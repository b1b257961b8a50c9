"""W&B must never stop a run: without an API key, or when its servers cannot be reached, log offline instead.

``train.py`` calls :func:`start_wandb_or_go_offline` right after the Trainer is made, before any heavy work: it starts
each ``WandbLogger``'s run; when that fails (no API key, no network, a timeout) it warns once and starts the run in
offline mode, in the logger's folder, from where ``wandb sync`` uploads it later. Other loggers are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


def start_wandb_or_go_offline(loggers: Iterable[Any]) -> bool:
    """Start the run of every ``WandbLogger`` in ``loggers``, offline if online fails; True if it went offline."""
    went_offline = False
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        init = getattr(logger, "_wandb_init", {})  # the arguments the logger passes to wandb.init
        if "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]  # Lightning passes anonymous=None, which wandb warns has no effect at every start
        if logger.save_dir:  # wandb looks for the git repository from there: a missing folder is a warning
            Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
        try:
            _ = logger.experiment  # wandb.init; a no-op on ranks other than 0
        except Exception as e:  # wandb raises UsageError (no key), CommError (unreachable), and others
            import wandb

            wandb.teardown()  # forget the settings of the failed attempt, so that the mode below applies
            os.environ["WANDB_MODE"] = "offline"
            if not went_offline:
                rank_zero_warn(
                    f"W&B could not start online ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                    f"Training goes on and logs offline to {logger.save_dir or os.environ.get('WANDB_DIR', '.')}; "
                    "upload later with `wandb sync <run folder>`, or set WANDB_MODE=offline to skip this attempt."
                )
            went_offline = True
            _ = logger.experiment
    return went_offline
