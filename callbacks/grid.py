"""Validation renders -> one labelled grid per step: a PNG under the run directory and an image in the loggers."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from callbacks.distributed import all_gather_list
from callbacks.run_dir import run_dir
from lightning_modules.safe_files import atomic_write

LABEL_HEIGHT = 14  # pixels of caption above each row


def make_grid(records: list[dict], title: str) -> Image.Image:
    """Rows = prompts (by ``prompt_index``), columns = samples (by ``image_index``), each row captioned.

    Each record holds ``image`` (H, W, 3) uint8, ``prompt``, ``prompt_index`` and ``image_index``.
    """
    rows = sorted({r["prompt_index"] for r in records})
    cols = sorted({r["image_index"] for r in records})
    h, w = records[0]["image"].shape[:2]
    width = max(len(cols) * w, 256)
    grid = Image.new("RGB", (width, LABEL_HEIGHT + len(rows) * (LABEL_HEIGHT + h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((2, 1), title, fill="black", font=font)
    by_cell = {(r["prompt_index"], r["image_index"]): r for r in records}
    for i, row in enumerate(rows):
        top = LABEL_HEIGHT + i * (LABEL_HEIGHT + h)
        prompt = next(r["prompt"] for r in records if r["prompt_index"] == row)
        draw.text((2, top + 1), prompt, fill="black", font=font)
        for j, col in enumerate(cols):
            if (row, col) in by_cell:
                grid.paste(Image.fromarray(by_cell[(row, col)]["image"]), (j * w, top + LABEL_HEIGHT))
    return grid


def save_png_atomic(image: Image.Image, path: Path) -> None:
    with atomic_write(path) as f:
        image.save(f, format="PNG")


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


class SampleGrid(pl.Callback):
    """Turns each validation run into a grid (rows = prompts, columns = samples, labelled with prompt and step).

    The grid is saved as ``<run dir>/grids/step_XXXXXX.png`` and logged to every logger that takes images: W&B (an
    image plus a ``wandb.Table`` of prompt, seed, image and per-image scores) and TensorBoard. Other loggers (CSV)
    get nothing extra; the PNG is on disk. Rank 0 writes; the other ranks send it their renders.

    Args:
        enabled: Set to false to skip grids.
        dirname: Folder, under the run directory, for the PNGs.
        log_table: Also log a W&B table with one row per image.
    """

    def __init__(self, enabled: bool = True, dirname: str = "grids", log_table: bool = True) -> None:
        self.enabled = enabled
        self.dirname = dirname
        self.log_table = log_table
        self._records: list[dict] = []
        self.last_grid: Path | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.enabled and outputs:
            self._records.extend(to_records(outputs))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        records = all_gather_list(self._records)
        self._records = []
        if not trainer.is_global_zero or not records:
            return
        step = trainer.global_step
        grid = make_grid(records, f"step {step}")
        path = run_dir(trainer) / self.dirname / f"step_{step:06d}.png"
        save_png_atomic(grid, path)
        self.last_grid = path
        for logger in trainer.loggers:
            log_grid(logger, grid, records, step, self.log_table)


def log_grid(logger, grid: Image.Image, records: list[dict], step: int, log_table: bool) -> None:
    """Send the grid to a logger that takes images; loggers that do not are left alone."""
    name = type(logger).__name__
    if name == "WandbLogger":
        import wandb

        caption = f"step {step}: " + " | ".join(sorted({r["prompt"] for r in records}))
        logger.log_image(key="val/grid", images=[grid], step=step, caption=[caption])
        if log_table:
            metric_names = sorted({k for r in records for k in r["scores"]})
            columns = ["step", "prompt", "seed", "image", *metric_names]
            rows = [
                [step, r["prompt"], r["seed"], wandb.Image(r["image"]), *(r["scores"].get(m) for m in metric_names)]
                for r in records
            ]
            logger.log_table(key="val/samples", columns=columns, data=rows, step=step)
    elif name == "TensorBoardLogger":
        logger.experiment.add_image("val/grid", np.asarray(grid), global_step=step, dataformats="HWC")
