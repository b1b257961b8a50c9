"""Subject-fidelity and prompt-fidelity metrics of the validation renders: ``val/dino``, ``val/clip_i``,
``val/clip_t`` and, optionally, ``val/pres`` and ``val/div``; with several concepts (``data.concepts``) each concept's
as ``val/dino/<concept>`` (and so on), scored against its own photos, and their mean as ``val/dino``."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from datamodules.images import load_image
from metrics import load_clip, load_dino
from metrics.dreambench import SubjectScorer, mean_over_subjects


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
        self.scorers: dict[str, SubjectScorer] = {}  # per concept (one without data.concepts), built in setup
        self.concept_of: list[int] = []  # each validation prompt's concept, by prompt index
        self.history: dict[int, dict[str, float]] = {}  # step -> the synchronized val/* of that validation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self.scorers or stage not in ("fit", "validate"):
            return
        datamodule = trainer.datamodule
        dino, clip = load_dino(self.dino_model), load_clip(self.clip_model, self.clip_pretrained)
        concepts = getattr(datamodule, "concepts", None)
        references = datamodule.concept_references() if concepts else {"": datamodule.reference_images()}
        identifiers = [c.identifier for c in concepts] if concepts else [datamodule.hparams.identifier]
        for (name, paths), identifier in zip(references.items(), identifiers, strict=True):
            images = [pil_to_tensor(load_image(p)).float() / 255 for p in paths]
            pres = self.pres and bool(datamodule.hparams.pres_prompt)
            div = self.div_distance if self.div else None
            self.scorers[name] = SubjectScorer(dino, clip, images, identifier, pres=pres, div=div).to(pl_module.device)
        if len(self.scorers) == 1:  # the plain options, or one concept: the metrics' names as they always were
            self.scorers = {"": next(iter(self.scorers.values()))}
        self.concept_of = list(getattr(datamodule.val_dataset, "concept_of", []) or [])

    @property
    def scorer(self) -> SubjectScorer | None:
        """The scorer of a run of one subject (None with several)."""
        return self.scorers.get("")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for scorer in self.scorers.values():
            scorer.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.scorers or not outputs:
            return
        if len(self.scorers) == 1:
            scores = self.scorer.update(
                outputs["images"], outputs["prompts"], outputs["prompt_index"], outputs["is_class_prompt"]
            )
        else:
            scores = self._update_concepts(outputs)
        outputs["scores"] = scores  # per image (PRES for the class prompt's): the grid's captions and W&B table

    def _update_concepts(self, outputs: dict) -> dict[str, torch.Tensor]:
        """Each render scored by its own concept's scorer (against that concept's photos); per-image scores in order."""
        concept = torch.tensor([self.concept_of[int(i)] for i in outputs["prompt_index"]])  # (N,)
        scores: dict[str, torch.Tensor] = {}
        for k, scorer in enumerate(self.scorers.values()):
            rows = (concept == k).nonzero().flatten().tolist()
            if not rows:
                continue
            part = scorer.update(
                outputs["images"][rows],
                [outputs["prompts"][r] for r in rows],
                [outputs["prompt_index"][r] for r in rows],
                [outputs["is_class_prompt"][r] for r in rows],
            )
            for name, values in part.items():
                scores.setdefault(name, torch.full((len(concept),), float("nan")))[rows] = values
        return scores

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.scorers:
            return
        per_concept = {name: scorer.compute() for name, scorer in self.scorers.items()}  # synchronized: every rank
        if len(per_concept) == 1:
            computed = per_concept[""]
        else:  # the mean over concepts, and each concept's
            computed = mean_over_subjects(per_concept)
            computed |= {f"{metric}/{name}": v for name, values in per_concept.items() for metric, v in values.items()}
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
