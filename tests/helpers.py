"""Callbacks that tests attach through the CLI (``--trainer.callbacks+=tests.helpers.X``)."""

import lightning.pytorch as pl


class RecordStart(pl.Callback):
    """Records the loop and optimizer state that training starts from (after a resume, the restored ones)."""

    def __init__(self) -> None:
        self.global_step: int | None = None
        self.optimizer_step: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.global_step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.optimizer_step = float(state[0]["step"]) if state else None  # a copy: the tensor is updated in place
