"""``test`` = the DreamBench evaluation: scores per subject, their mean, and a report with grids."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchvision.transforms.v2.functional import pil_to_tensor

from callbacks.distributed import all_gather_list
from callbacks.grid import to_records
from callbacks.pictures import (
    DEFAULT_CELL_SIZE,
    check_cell_size,
    make_grid,
    model_line,
    reference_row,
    save_png_atomic,
    settings_line,
    thumbnail,
)
from callbacks.run_dir import run_dir
from datamodules.images import list_images, load_image
from metrics import load_clip, load_dino
from metrics.dreambench import SubjectScorer, mean_over_subjects, write_report

PROTOCOL = "DreamBench (DreamBooth, arXiv 2208.12242, sec. 4.1): scores averaged per subject, then over subjects"


class DreamBenchEvaluation(pl.Callback):
    """Scores the renders of ``test`` per subject (DINO, CLIP-I, CLIP-T, PRES, DIV) and writes the report.

    ``<run dir>/<dirname>/``: ``report.json`` (per-subject and mean scores, the encoders, the DIV distance, the
    sampler settings, the model), ``report.csv`` (a row per subject and ``mean``), ``images.csv`` (a row per render
    with its scores) and ``grids/<subject>.png`` (the subject's photos as trained, then its renders, each captioned with
    its seed and scores, enlarged or reduced to ``cell_size``). The means are logged as ``test/dino``, ``test/clip_i``, ... Every
    subject is rendered by the same model: the one the run loads (base model, ``--ckpt_path`` or
    ``model.lora_weights``). The encoders are those of the ``metrics`` group (linked by the CLI).

    Args:
        enabled: Set to false to skip scoring and the report.
        dirname: Folder, under the run directory, for the report.
        dino_model: DINO encoder (DINO, PRES). Linked from ``metrics.dino_model``.
        clip_model: open_clip architecture (CLIP-I, CLIP-T). Linked from ``metrics.clip_model``.
        clip_pretrained: open_clip pretrained tag. Linked from ``metrics.clip_pretrained``.
        div_distance: DIV's distance, ``lpips`` or ``dino``. Linked from ``metrics.div_distance``.
        cell_size: Longest side of a cell of the per-subject grids, in pixels. Linked from ``grid.cell_size``.
        grid_size: Deprecated and ignored (run configs saved before ``cell_size`` replaced it still load); the cells
            are ``grid.cell_size``.
    """

    def __init__(
        self,
        enabled: bool = True,
        dirname: str = "eval",
        dino_model: str = "facebook/dino-vits16",
        clip_model: str = "ViT-B-32",
        clip_pretrained: str | None = "openai",
        div_distance: Literal["lpips", "dino"] = "lpips",
        cell_size: int = DEFAULT_CELL_SIZE,
        grid_size: int | None = None,
    ) -> None:
        if grid_size is not None:
            rank_zero_warn(f"evaluation.grid_size ({grid_size}) is ignored: the grids' cells are grid.cell_size now.")
        self.enabled, self.dirname = enabled, dirname
        self.cell_size = check_cell_size(cell_size, "evaluation.cell_size")
        self.dino_model, self.clip_model, self.clip_pretrained = dino_model, clip_model, clip_pretrained
        self.div_distance = div_distance
        self.scorers: list[SubjectScorer] = []
        self._records: list[dict] = []
        self.report: dict | None = None  # the last report written

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "test":
            return
        datamodule = trainer.datamodule
        dino, clip = load_dino(self.dino_model), load_clip(self.clip_model, self.clip_pretrained)
        pres = bool(datamodule.hparams.pres_prompt)
        self.scorers = []
        for subject in datamodule.test_subjects:
            references = [pil_to_tensor(load_image(p)).float() / 255 for p in list_images(subject.image_dir)]
            identifier = subject.identifier or datamodule.hparams.identifier
            scorer = SubjectScorer(dino, clip, references, identifier, pres, self.div_distance)
            self.scorers.append(scorer.to(pl_module.device))

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for scorer in self.scorers:
            scorer.reset()
        self._records = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.scorers or not outputs:
            return
        subjects = torch.tensor(outputs["subject_index"])  # (N,) a batch may hold prompts of two subjects
        scores: dict[str, torch.Tensor] = {}
        for s in subjects.unique().tolist():
            rows = (subjects == s).nonzero().flatten().tolist()
            pick = [outputs[k] for k in ("prompts", "prompt_index", "is_class_prompt")]
            got = self.scorers[s].update(outputs["images"][rows], *([values[i] for i in rows] for values in pick))
            for name, values in got.items():
                scores.setdefault(name, torch.full((len(subjects),), float("nan")))[rows] = values
        outputs["scores"] = scores  # per image, for images.csv
        for record, subject in zip(to_records(outputs), outputs["subject_index"], strict=True):
            record["subject_index"] = subject
            record["image"] = thumbnail(record["image"], self.cell_size)
            self._records.append(record)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.scorers:
            return
        subjects = trainer.datamodule.test_subjects
        per_subject = {s.name: scorer.compute() for s, scorer in zip(subjects, self.scorers, strict=True)}  # synced
        records = all_gather_list(self._records)
        self._records = []
        mean = mean_over_subjects(per_subject)
        trainer.callback_metrics.update({f"test/{k}": torch.tensor(v) for k, v in mean.items()})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({f"test/{k}": v for k, v in mean.items()}, step=trainer.global_step)
        folder = run_dir(trainer) / self.dirname
        self.report = self._report(trainer, pl_module, subjects, per_subject, mean, records)
        paths = write_report(folder, self.report, [_image_row(r, subjects) for r in records])
        settings, resolution = pl_module.render_settings(), trainer.datamodule.hparams.resolution
        for index, subject in enumerate(subjects):
            mine = [r for r in records if r["subject_index"] == index]
            if mine:
                title = [
                    f"{subject.name} ({subject.class_noun}): " + _scores_text(per_subject[subject.name]),
                    settings_line(settings),
                    model_line(settings) + (f", checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else ""),
                ]
                photos = reference_row(list_images(subject.image_dir), resolution)
                save_png_atomic(
                    make_grid(mine, title, self.cell_size, photos), folder / "grids" / f"{subject.name}.png"
                )
        rank_zero_info(f"DreamBench report: {paths['json']}  mean: {_scores_text(mean)}")

    def _report(self, trainer, pl_module, subjects, per_subject, mean, records) -> dict:
        data = trainer.datamodule.hparams
        counts = [
            sum(r["subject_index"] == i and not r["is_class_prompt"] for r in records) for i in range(len(subjects))
        ]
        return {
            "protocol": PROTOCOL,
            "model": {"checkpoint": trainer.ckpt_path, **pl_module.render_settings()},
            "encoders": {
                "dino": self.scorers[0].metrics["dino"].encoder.name,
                "clip": self.scorers[0].metrics["clip_t"].encoder.name,
                "div_distance": self.scorers[0].div_distance,
            },
            "prompts": {
                "identifier": data.identifier,
                "eval_prompts": data.eval_prompts,
                "class_prompt": data.pres_prompt,
                "images_per_prompt": data.eval_num_images,
                "seed": data.eval_seed,
            },
            "subjects": {
                s.name: {
                    "class": s.class_noun,
                    "live": s.live,
                    "images": counts[i],
                    "prompts": len(s.templates),
                    "references": len(list_images(s.image_dir)),
                    "image_dir": str(s.image_dir),
                    **per_subject[s.name],
                }
                for i, s in enumerate(subjects)
            },
            "mean": mean,
            "num_subjects": len(subjects),
        }


def _image_row(record: dict, subjects) -> dict:
    scores = record["scores"]
    return {
        "subject": subjects[record["subject_index"]].name,
        "prompt": record["prompt"],
        "class_prompt": record["is_class_prompt"],
        "seed": record["seed"],
        **{name: scores.get(name, float("nan")) for name in ("dino", "clip_i", "clip_t", "pres")},
    }


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
