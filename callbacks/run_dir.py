"""The run directory: where a run's config, grids and export go, beside its checkpoints, for every logger."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback


def run_dir(trainer: pl.Trainer) -> Path:
    """``<save_dir>/<name>/<version>``: the folder that holds this run's ``checkpoints/``, whatever the logger.

    TensorBoard and CSV loggers name it themselves (``version_N``); for W&B it is ``<save_dir>/<project>/<run id>``,
    as Lightning's ``ModelCheckpoint`` uses, so two W&B runs never share a folder.
    """
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if type(logger).__name__ in ("TensorBoardLogger", "CSVLogger"):
        return Path(logger.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run directory and sends it to the loggers (W&B)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update({"cli": self.config.as_dict()}, allow_val_change=True)
