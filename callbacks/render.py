"""``predict`` renders -> PNG files that carry their prompt, seed and settings, and a contact sheet beside them."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from callbacks.distributed import all_gather_list
from callbacks.grid import to_records
from callbacks.pictures import DEFAULT_CELL_SIZE, check_cell_size, make_grid, model_line, save_png_atomic, settings_line
from callbacks.run_dir import run_dir
from sd.render.infotext import render_text_chunks, save_png

CONTACT_SHEET = "contact_sheet.png"


def image_filename(record: dict) -> str:
    """``<prompt #>-<image #>-<seed>-<prompt, as a slug>.png``: sorted by prompt, then image, and readable."""
    slug = re.sub(r"[^a-z0-9]+", "-", record["prompt"].lower()).strip("-")[:48].rstrip("-")
    return f"{record['prompt_index']:03d}-{record['image_index']:02d}-{record['seed']}-{slug}.png"


class RenderWriter(pl.Callback):
    """Writes what ``predict`` renders: one PNG per image, whose ``parameters`` text chunk holds the prompt, negative
    prompt, seed and settings as AUTOMATIC1111 writes them (plus a JSON copy in ``dreambooth_lightning``), and
    ``contact_sheet.png`` (rows = prompts, columns = images, each image enlarged or reduced to ``cell_size`` and
    captioned with its seed; the PNGs themselves keep the rendered size). Rank 0 writes; the other ranks send it their
    renders.

    Args:
        dirpath: Where to write; defaults to ``<run directory>/predict``.
        contact_sheet: Also write the contact sheet.
        cell_size: Longest side of a contact-sheet cell, in pixels. Linked from ``grid.cell_size`` by the CLI.
    """

    def __init__(
        self, dirpath: str | None = None, contact_sheet: bool = True, cell_size: int = DEFAULT_CELL_SIZE
    ) -> None:
        self.dirpath = dirpath
        self.contact_sheet = contact_sheet
        self.cell_size = check_cell_size(cell_size, "render.cell_size")
        self._records: list[dict] = []
        self.written: list[Path] = []  # the last predict run's images

    def output_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath).expanduser() if self.dirpath else run_dir(trainer) / "predict"

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs:
            self._records.extend(to_records(outputs))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        records = all_gather_list(self._records)
        self._records = []
        if not trainer.is_global_zero or not records:
            return
        folder = self.output_dir(trainer)
        settings = pl_module.render_settings()
        self.written = [
            save_png(
                Image.fromarray(r["image"]),
                folder / image_filename(r),
                render_text_chunks(r["prompt"], r["seed"], settings),
            )
            for r in sorted(records, key=lambda r: (r["prompt_index"], r["image_index"]))
        ]
        if self.contact_sheet:
            title = [f"predict: {len(records)} images", settings_line(settings), model_line(settings)]
            save_png_atomic(make_grid(records, title, self.cell_size), folder / CONTACT_SHEET)
        rank_zero_info(f"Wrote {len(self.written)} images to {folder}")
