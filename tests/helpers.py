"""Callbacks that tests attach through the CLI (``--trainer.callbacks+=tests.helpers.X``)."""

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint


class RecordStart(pl.Callback):
    """Records the loop and optimizer state that training starts from (after a resume, the restored ones)."""

    def __init__(self) -> None:
        self.global_step: int | None = None
        self.optimizer_step: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.global_step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.optimizer_step = float(state[0]["step"]) if state else None  # a copy: the tensor is updated in place


class PoisonBatch(pl.Callback):
    """Makes the images (pixels, or cached latents) of the batch of optimizer step ``step`` (1-based) NaN, so that its
    loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            batch["latent_mean" if "latent_mean" in batch else "pixel_values"].fill_(float("nan"))


class PoisonWeights(pl.Callback):
    """After optimizer step ``step``, sets one trained weight to NaN (before the checkpoint callbacks run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.requires_grad).data.fill_(float("nan"))


class RecordWeights(pl.Callback):
    """Copies of the trained weights after each optimizer step, by step."""

    def __init__(self) -> None:
        self.by_step: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trained = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.by_step[trainer.global_step] = trained


class SendSignal(pl.Callback):
    """Sends ``signum`` (a number: 15 SIGTERM, 2 SIGINT) to this process ``times`` times after optimizer step ``step``."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class ReportStep(pl.Callback):
    """Prints ``fault-injection: step N`` after each optimizer step (before the checkpoint callbacks save it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"fault-injection: step {trainer.global_step}", flush=True)


class SendSignalLate(Checkpoint):
    """Like :class:`SendSignal`, but a ``Checkpoint`` callback: Lightning runs it after every other callback."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordPrompts(pl.Callback):
    """The prompts of each training batch, in order, whether it carried cached text embeddings, its loss weights."""

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []
        self.cached_embeddings: list[bool] = []
        self.loss_weights: list = []  # each batch's loss_weight (a copy), or None
        self.is_prior: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts.append(list(batch["prompts"]))
        self.cached_embeddings.append("prompt_embeds" in batch)
        weight = batch.get("loss_weight")
        self.loss_weights.append(None if weight is None else weight.detach().cpu().clone())
        self.is_prior.append(batch["is_prior"].detach().cpu().clone())


class RecordInstancePrompts(pl.Callback):
    """Appends ``<epoch> <global step> <global rank> <prompt>`` for each instance row of each training batch to the file
    named by the environment variable ``RECORD_PROMPTS`` (one line per row; ranks append to the same file)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = [p for p, prior in zip(batch["prompts"], batch["is_prior"].tolist(), strict=True) if not prior]
        with open(os.environ["RECORD_PROMPTS"], "a", encoding="utf-8") as f:
            for prompt in rows:
                f.write(f"{trainer.current_epoch} {trainer.global_step} {trainer.global_rank} {prompt}\n")


class RecordGeometry(pl.Callback):
    """Each training batch's image shape (pixels or latents), ``original_sizes`` and ``crop_top_lefts`` (or None)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.original_sizes: list = []
        self.crop_top_lefts: list = []
        self.is_prior: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(tuple(batch["latent_mean" if "latent_mean" in batch else "pixel_values"].shape))
        for name in ("original_sizes", "crop_top_lefts"):
            value = batch.get(name)
            getattr(self, name).append(None if value is None else value.detach().cpu().clone())
        self.is_prior.append(batch["is_prior"].detach().cpu().clone())


class SaveTrainedWeights(pl.Callback):
    """Saves each rank's trained weights when training starts and ends, to ``$SAVE_WEIGHTS_DIR/{start,end}_rank<r>.pt``
    (for comparing the ranks of a multi-process fit)."""

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        import torch

        trained = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(trained, os.path.join(os.environ["SAVE_WEIGHTS_DIR"], f"{when}_rank{trainer.global_rank}.pt"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "end")
