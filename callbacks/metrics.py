"""Subject-fidelity and prompt-fidelity metrics of the validation renders: ``val/dino``, ``val/clip_i``,
``val/clip_t`` and, optionally, ``val/pres`` and ``val/div``."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from datamodules.images import load_image
from metrics import load_clip, load_dino
from metrics.dreambench import SubjectScorer


class SubjectMetrics(pl.Callback):
    """Scores every validation run against the subject's real images, with the DreamBench metrics.

    Encoders load once (in ``setup``), in eval mode, without grad, on the training device; they are held by this
    callback, so they never enter a checkpoint. The real images' embeddings are computed once. Metrics are
    torchmetrics ``Metric``s, so under DDP each rank scores its own prompts and ``compute`` synchronizes them.
    ``ModelCheckpoint(monitor="val/dino", mode="max")`` can keep the best step.

    Args:
        enabled: Set to false to skip the metrics (the grid is still rendered).
        dino_model: DINO ViT for ``val/dino`` and ``val/pres``: a hub id (``facebook/dino-vits16``, the
            protocol's) or ``builtin:tiny-dino`` (offline tests).
        clip_model: open_clip architecture for ``val/clip_i`` and ``val/clip_t`` (``ViT-B-32``, ``ViT-L-14``, ...), or
            ``builtin:tiny-clip``.
        clip_pretrained: open_clip pretrained tag (``openai``); null for the built-in model.
        pres: Log ``val/pres`` (lower is better): DINO between the real images and renders of the bare class prompt
            (``data.pres_prompt``).
        div: Log ``val/div`` (higher is better): mean pairwise distance between renders of the same prompt.
        div_distance: ``lpips`` (the protocol's; downloads AlexNet weights once) or ``dino`` (1 - DINO cosine,
            offline). Reports must say which.
    """

    def __init__(
        self,
        enabled: bool = True,
        dino_model: str = "facebook/dino-vits16",
        clip_model: str = "ViT-B-32",
        clip_pretrained: str | None = "openai",
        pres: bool = True,
        div: bool = False,
        div_distance: Literal["lpips", "dino"] = "lpips",
    ) -> None:
        self.enabled = enabled
        self.dino_model, self.clip_model, self.clip_pretrained = dino_model, clip_model, clip_pretrained
        self.pres, self.div, self.div_distance = pres, div, div_distance
        self.scorer: SubjectScorer | None = None  # built in setup
        self.history: dict[int, dict[str, float]] = {}  # step -> the synchronized val/* of that validation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self.scorer is not None or stage not in ("fit", "validate"):
            return
        datamodule = trainer.datamodule
        references = [pil_to_tensor(load_image(p)).float() / 255 for p in datamodule.reference_images()]
        self.scorer = SubjectScorer(
            load_dino(self.dino_model),
            load_clip(self.clip_model, self.clip_pretrained),
            references,
            datamodule.hparams.identifier,
            pres=self.pres and bool(datamodule.hparams.pres_prompt),
            div=self.div_distance if self.div else None,
        ).to(pl_module.device)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scorer is not None:
            self.scorer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.scorer is None or not outputs:
            return
        scores = self.scorer.update(
            outputs["images"], outputs["prompts"], outputs["prompt_index"], outputs["is_class_prompt"]
        )
        outputs["scores"] = scores  # per image (PRES for the class prompt's): the grid's captions and W&B table

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scorer is None:
            return
        computed = self.scorer.compute()  # synchronized: every rank gets the same values
        self.history[trainer.global_step] = computed
        values = {f"val/{name}": torch.tensor(v) for name, v in computed.items()}
        # Logged directly at the optimizer step the renders were made after (0 = the base model, before training),
        # the step of the grid too; Lightning's own logging would drop the pre-training baseline.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: v.item() for k, v in values.items()}, step=trainer.global_step)
        if not trainer.sanity_checking:
            trainer.callback_metrics.update(values)  # what ModelCheckpoint(monitor="val/dino") reads

    def state_dict(self) -> dict:
        """The ``val/*`` of every validation so far, by step: a resumed run's summary and strip still know them."""
        return {"history": {step: dict(values) for step, values in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {int(step): dict(values) for step, values in state_dict.get("history", {}).items()}


def validation_history(trainer: pl.Trainer) -> dict[int, dict[str, float]]:
    """Step -> that validation's metrics (``dino``, ``clip_i``, ...), from the run's :class:`SubjectMetrics`; empty when
    metrics are off."""
    for callback in trainer.callbacks:
        if isinstance(callback, SubjectMetrics):
            return callback.history
    return {}
