"""Validation renders -> one labelled grid per step and, over ``fit``, the progress strip: PNGs under the run directory
and images in the loggers. The pictures themselves are drawn by :mod:`callbacks.pictures` (Lightning-free)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from callbacks.distributed import all_gather_list
from callbacks.metrics import validation_history
from callbacks.pictures import (
    DEFAULT_CELL_SIZE,
    Row,
    check_cell_size,
    compose,
    make_grid,
    model_line,
    progress_rows,
    progress_title,
    reference_row,
    save_png_atomic,
    select_steps,
    settings_line,
    thumbnail,
)
from callbacks.run_dir import run_dir

__all__ = ["SampleGrid", "log_grid", "make_grid", "save_png_atomic", "to_records"]
PROGRESS = "progress.png"


def to_records(outputs: dict) -> list[dict]:
    """The module's validation outputs -> one small, picklable record per image."""
    images = (outputs["images"].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    keys = ("prompts", "seeds", "prompt_index", "image_index", "is_class_prompt")
    scores = outputs.get("scores", {})
    return [
        {
            "image": np.ascontiguousarray(images[k]),
            "prompt": outputs["prompts"][k],
            "seed": outputs["seeds"][k],
            "prompt_index": outputs["prompt_index"][k],
            "image_index": outputs["image_index"][k],
            "is_class_prompt": outputs["is_class_prompt"][k],
            "scores": {name: float(v[k]) for name, v in scores.items()},
        }
        for k in range(len(outputs[keys[0]]))
    ]


def grid_title(step: int, settings: dict, metrics: dict[str, float]) -> list[str]:
    """The header of a validation grid: the step (and its ``val/*`` means), the sampler settings, the model."""
    means = " | ".join(f"val/{name} {value:.3f}" for name, value in metrics.items())
    return [f"step {step}" + (f"   {means}" if means else ""), settings_line(settings), model_line(settings)]


class SampleGrid(pl.Callback):
    """Turns each validation run into a grid, and the validations of ``fit`` into a progress strip.

    The grid (rows = prompts, columns = samples) opens with the subject's photos as trained; each render is enlarged
    or reduced to ``cell_size`` and captioned with its seed and per-image DINO / CLIP-I / CLIP-T; the header gives the
    step, its ``val/*`` means, the sampler settings and the LoRA scales. It is saved as
    ``<run dir>/grids/step_XXXXXX.png`` and logged to every logger that takes images: W&B (``val/grid``, plus a
    ``wandb.Table`` ``val/samples`` of prompt, seed, image and per-image scores) and TensorBoard. Other loggers (CSV)
    get nothing extra; the PNG is on disk.

    The progress strip follows the first ``progress_prompts`` validation prompts, image 1 of each (the same seed at
    every validation), one column per validation step with the step and ``val/dino`` under each (at most 12 columns:
    the first, the last and evenly spaced ones between). It is rewritten as ``<run dir>/grids/progress.png`` after
    every validation of ``fit`` (an interrupted run keeps it) and logged (W&B ``val/progress``) when ``fit`` ends.
    Its images (one per strip prompt and validation, reduced to ``cell_size`` when larger) are the callback's
    checkpoint state, so a resumed run's strip starts at step 0, as an uninterrupted run's does.

    Rank 0 draws and writes; the other ranks send it their renders. Nothing here draws a random number.

    Args:
        enabled: Set to false to skip grids and the progress strip.
        dirname: Folder, under the run directory, for the PNGs.
        log_table: Also log a W&B table with one row per image.
        cell_size: Longest side of a grid cell, in pixels (at least 128): smaller renders are enlarged with nearest
            neighbour by a whole factor (32 px -> 256 px), larger ones reduced. The same for ``predict``'s contact
            sheet and ``test``'s grids (linked to ``render.cell_size`` and ``evaluation.cell_size``).
        reference_row: Open each grid (and the progress strip) with the subject's photos as trained: resized and
            center-cropped to ``data.resolution``, labelled with their file names.
        progress_prompts: How many validation prompts (the first ones, not the bare class prompt) the progress strip
            follows; 0 for no strip.
    """

    def __init__(
        self,
        enabled: bool = True,
        dirname: str = "grids",
        log_table: bool = True,
        cell_size: int = DEFAULT_CELL_SIZE,
        reference_row: bool = True,
        progress_prompts: int = 4,
    ) -> None:
        self.enabled = enabled
        self.dirname = dirname
        self.log_table = log_table
        self.cell_size = check_cell_size(cell_size, "grid.cell_size")
        self.reference_row = reference_row
        self.progress_prompts = max(0, progress_prompts)
        self._records: list[dict] = []
        self._reference: Row | None = None  # the subject's photos, loaded on rank 0 at the first validation
        self.progress: dict[int, list[dict]] = {}  # step -> the strip's records of that validation
        self.last_grid: Path | None = None
        self.progress_path: Path | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.enabled and outputs:
            self._records.extend(to_records(outputs))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        records = all_gather_list(self._records)  # every rank takes part
        self._records = []
        if not trainer.is_global_zero or not records:
            return
        step, settings = trainer.global_step, pl_module.render_settings()
        metrics = validation_history(trainer).get(step, {})
        grid = make_grid(records, grid_title(step, settings, metrics), self.cell_size, self.reference(trainer))
        folder = run_dir(trainer) / self.dirname
        self.last_grid = folder / f"step_{step:06d}.png"
        save_png_atomic(grid, self.last_grid)
        for logger in trainer.loggers:
            log_grid(logger, grid, records, step, self.log_table)
        if trainer.state.fn == "fit" and self.progress_prompts:
            self.progress[step] = self._strip_records(records)
            self.progress_path = folder / PROGRESS
            save_png_atomic(self.progress_strip(trainer, settings), self.progress_path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.enabled and self.progress and trainer.is_global_zero):
            return
        strip = self.progress_strip(trainer, pl_module.render_settings())
        for logger in trainer.loggers:
            log_image(logger, "val/progress", strip, trainer.global_step, f"steps {', '.join(map(str, self.progress))}")

    def reference(self, trainer: pl.Trainer) -> Row | None:
        """The subject's photos as trained, from the data module (``reference_images()``, ``hparams.resolution``)."""
        datamodule = trainer.datamodule
        if self._reference is None and self.reference_row and hasattr(datamodule, "reference_images"):
            hp = datamodule.hparams
            note = "" if getattr(hp, "center_crop", True) else "; training crops at random around it"
            self._reference = reference_row(datamodule.reference_images(), hp.resolution, note)
        return self._reference

    def progress_strip(self, trainer: pl.Trainer, settings: dict) -> Image.Image:
        history = validation_history(trainer)
        dino = {step: values["dino"] for step, values in history.items() if "dino" in values}
        reference = self.reference(trainer)
        rows = ([reference] if reference else []) + progress_rows(self.progress, dino)
        return compose(progress_title(list(self.progress), select_steps(self.progress), settings), rows, self.cell_size)

    def _strip_records(self, records: list[dict]) -> list[dict]:
        """Image 1 of each of the first ``progress_prompts`` subject prompts, reduced to the cell size if larger."""
        subject = sorted({r["prompt_index"] for r in records if not r["is_class_prompt"]})[: self.progress_prompts]
        first = sorted((r for r in records if r["prompt_index"] in subject), key=lambda r: r["image_index"])
        keep = {}
        for r in first:
            keep.setdefault(r["prompt_index"], r)
        return [
            {
                "prompt_index": i,
                "prompt": r["prompt"],
                "seed": r["seed"],
                "image": thumbnail(r["image"], self.cell_size),
            }
            for i, r in sorted(keep.items())
        ]

    def state_dict(self) -> dict:
        """The strip's images (uint8 tensors) by step: checkpoints carry them so that a resumed run's strip is whole."""
        return {
            "progress": {
                step: [{**r, "image": torch.from_numpy(np.ascontiguousarray(r["image"]))} for r in records]
                for step, records in self.progress.items()
            }
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.progress = {
            int(step): [{**r, "image": r["image"].numpy()} for r in records]
            for step, records in state_dict.get("progress", {}).items()
        }


def log_image(logger, key: str, picture: Image.Image, step: int, caption: str) -> None:
    """A picture to a logger that takes images (W&B, TensorBoard); other loggers are left alone."""
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key=key, images=[picture], step=step, caption=[caption])
    elif name == "TensorBoardLogger":
        logger.experiment.add_image(key, np.asarray(picture), global_step=step, dataformats="HWC")


def log_grid(logger, grid: Image.Image, records: list[dict], step: int, log_table: bool) -> None:
    """Send the grid (and, to W&B, the table of renders) to a logger that takes images."""
    log_image(logger, "val/grid", grid, step, f"step {step}: " + " | ".join(sorted({r["prompt"] for r in records})))
    if log_table and type(logger).__name__ == "WandbLogger":
        import wandb

        metric_names = sorted({k for r in records for k in r["scores"]})
        columns = ["step", "prompt", "seed", "image", *metric_names]
        rows = [
            [step, r["prompt"], r["seed"], wandb.Image(r["image"]), *(r["scores"].get(m) for m in metric_names)]
            for r in records
        ]
        logger.log_table(key="val/samples", columns=columns, data=rows, step=step)
