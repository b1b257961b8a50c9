"""The pictures a person judges a run by, Lightning-free: renders at a size the eye can judge, captions, the subject's
photos as a reference row, and the progress strip. Validation grids, ``predict``'s contact sheet, ``test``'s
per-subject grids and the scale sweep all draw through :func:`compose`.

A cell holds one image with its longest side at about ``cell_size`` pixels: a smaller render is enlarged by a whole
factor with nearest neighbour (a 32 px render becomes 256 px of 8 x 8 blocks: its own pixels, not a blur), a larger
one is reduced (Lanczos). Only the picture is resized; images saved on their own (``predict``'s PNGs) are untouched.

Each picture carries its layout (title, row labels, each cell's box and caption) as JSON in the PNG text chunk
:data:`LAYOUT_KEY`, so tools and tests can read a grid back without reading its text off the pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from core.errors import ConfigError
from core.safe_files import atomic_write
from datamodules.datasets import as_trained
from datamodules.images import load_image

DEFAULT_CELL_SIZE = 256
MIN_CELL_SIZE = 128  # a 32 px render shown at 32 px is a thumbnail the eye cannot judge
LAYOUT_KEY = "dreambooth_lightning_layout"
MAX_REFERENCE_PHOTOS = 8  # the reference row shows the first 8 photos (its label says how many there are)
MAX_PROGRESS_COLUMNS = 12  # the progress strip shows at most 12 validations: the first, the last, evenly between
GAP = 6  # pixels between cells
MARGIN = 8  # pixels around the picture
# Short metric names in captions, in this order; per-image scores (DreamBench: higher is better except PRES).
CAPTION_METRICS = {"dino": "dino", "clip_i": "clip-i", "clip_t": "clip-t", "pres": "pres"}


def check_cell_size(cell_size: int, option: str) -> int:
    """``cell_size``, or a :class:`ConfigError` naming ``option`` when it is below :data:`MIN_CELL_SIZE`."""
    if cell_size < MIN_CELL_SIZE:
        raise ConfigError(f"{option} must be at least {MIN_CELL_SIZE} (pixels of a grid cell), got {cell_size}.")
    return cell_size


def cell_shape(height: int, width: int, cell_size: int) -> tuple[int, int]:
    """(height, width) of an image of that size in a cell: enlarged by the whole factor that brings its longest side
    closest to ``cell_size`` without passing it (but to at least :data:`MIN_CELL_SIZE`), or reduced to ``cell_size``."""
    longest = max(height, width)
    if longest > cell_size:
        scale = cell_size / longest
        return max(1, round(height * scale)), max(1, round(width * scale))
    factor = max(cell_size // longest, math.ceil(MIN_CELL_SIZE / longest), 1)
    return height * factor, width * factor


def fit_cell(image: np.ndarray | Image.Image, cell_size: int) -> Image.Image:
    """An image ((H, W, 3) uint8 or PIL) at its cell size (see :func:`cell_shape`); a new image, the input unchanged."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    picture = picture.convert("RGB")
    height, width = cell_shape(picture.height, picture.width, cell_size)
    if (height, width) == (picture.height, picture.width):
        return picture.copy()
    enlarge = height > picture.height
    resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS
    return picture.resize((width, height), resample)


def thumbnail(image: np.ndarray, cell_size: int) -> np.ndarray:
    """What to keep of a render for a later picture: (H, W, 3) uint8 reduced to fit a cell when larger, else a copy
    (enlarging is for the picture only, and a view would keep the whole batch it came from in memory)."""
    if max(image.shape[:2]) <= cell_size:
        return np.array(image, copy=True)
    return np.asarray(fit_cell(image, cell_size))


def font_size(cell_size: int) -> int:
    """Text height, in pixels, for cells of that size: 16 px at 256 px cells, between 12 and 24."""
    return min(24, max(12, cell_size // 16))


def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font (Aileron, no download) at ``size`` pixels; its small bitmap font on an old Pillow."""
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


@dataclass
class Cell:
    """One image and the caption chunks under it (packed into lines that fit the cell, e.g. ``["seed 7", "dino 0.1"]``)."""

    image: np.ndarray | Image.Image
    caption: list[str] = field(default_factory=list)


@dataclass
class Row:
    """A labelled row of cells (None leaves a slot empty). ``kind`` is recorded in the layout: ``renders``,
    ``reference`` (the subject's photos) or ``progress``."""

    label: str
    cells: list[Cell | None]
    kind: str = "renders"


class _Text:
    """Measuring and wrapping text in one font."""

    def __init__(self, size: int) -> None:
        self.font = load_font(size)
        top, bottom = self.font.getbbox("Ag|")[1::2]
        self.line_height = bottom + max(3, size // 4)

    def width(self, text: str) -> float:
        return self.font.getlength(text)

    def wrap(self, chunks: Sequence[str], width: int, sep: str = ", ") -> list[str]:
        """Pack ``chunks`` into lines of at most ``width`` pixels, joined by ``sep``; a chunk too long for a line is
        split at spaces, and a word too long for a line (a path) is broken where the line is full."""
        lines: list[str] = []
        for chunk in chunks:
            candidate = f"{lines[-1]}{sep}{chunk}" if lines else chunk
            if lines and self.width(candidate) <= width:
                lines[-1] = candidate
                continue
            lines.extend(self._split(chunk, width))
        return lines

    def _split(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for word in text.split(" "):
            candidate = f"{lines[-1]} {word}" if lines else word
            if lines and self.width(candidate) <= width:
                lines[-1] = candidate
            else:
                lines.extend(self._break(word, width))
        return lines or [""]

    def _break(self, word: str, width: int) -> list[str]:
        pieces = [""]
        for char in word:
            if pieces[-1] and self.width(pieces[-1] + char) > width:
                pieces.append("")
            pieces[-1] += char
        return pieces


def compose(title: Sequence[str], rows: Sequence[Row], cell_size: int) -> Image.Image:
    """Draw a picture: the title lines, then each row's label above its cells, each cell's caption under it.

    Cells are fitted to ``cell_size`` (:func:`fit_cell`) and placed in columns of equal width. The layout, as JSON,
    is in ``picture.info[LAYOUT_KEY]`` (written into the PNG by :func:`save_png_atomic`).
    """
    text, heading = _Text(font_size(cell_size)), _Text(font_size(cell_size) + 4)
    fitted = [[fit_cell(c.image, cell_size) if c is not None else None for c in row.cells] for row in rows]
    slot = max((im.width for line in fitted for im in line if im is not None), default=cell_size)
    columns = max((len(row.cells) for row in rows), default=0)
    inner = max(columns * slot + (columns - 1) * GAP, 2 * cell_size + GAP)  # room for the title even with 1 column
    title_lines = [
        (line, heading if i == 0 else text)
        for i, t in enumerate(title)
        for line in (heading if i == 0 else text).wrap([t], inner, sep=" ")
    ]
    # Measure every row: label lines, image height, caption lines.
    plans = []
    for row, images in zip(rows, fitted, strict=True):
        label = text.wrap([row.label], inner, sep=" ") if row.label else []
        captions = [text.wrap(c.caption, slot) if c is not None else [] for c in row.cells]
        image_height = max((im.height for im in images if im is not None), default=0)
        caption_height = max((len(c) for c in captions), default=0) * text.line_height
        plans.append((label, captions, image_height, caption_height))
    height = MARGIN + sum(font.line_height for _, font in title_lines) + GAP
    height += sum(len(lb) * text.line_height + ih + ch + 3 * GAP for lb, _, ih, ch in plans) + MARGIN
    picture = Image.new("RGB", (inner + 2 * MARGIN, height), "white")
    draw = ImageDraw.Draw(picture)
    layout: dict[str, Any] = {"title": list(title), "cell_size": cell_size, "rows": []}  # as given, not wrapped
    y = MARGIN
    for line, font in title_lines:
        draw.text((MARGIN, y), line, fill="black", font=font.font)
        y += font.line_height
    y += GAP
    for row, images, (label, captions, image_height, caption_height) in zip(rows, fitted, plans, strict=True):
        for line in label:
            draw.text((MARGIN, y), line, fill="black", font=text.font)
            y += text.line_height
        cells = []
        for j, (image, caption) in enumerate(zip(images, captions, strict=True)):
            if image is None:
                cells.append(None)
                continue
            x = MARGIN + j * (slot + GAP)
            picture.paste(image, (x, y))
            for k, line in enumerate(caption):
                draw.text((x, y + image_height + 2 + k * text.line_height), line, fill=(60, 60, 60), font=text.font)
            cells.append({"box": [x, y, x + image.width, y + image.height], "caption": caption})
        layout["rows"].append({"label": row.label, "kind": row.kind, "cells": cells})
        y += image_height + caption_height + 2 * GAP
        if row.kind == "reference":  # a rule between the subject's photos and the renders
            draw.line([(MARGIN, y), (MARGIN + inner, y)], fill=(170, 170, 170), width=2)
        y += GAP
    picture.info[LAYOUT_KEY] = json.dumps(layout)
    return picture


def read_layout(path: str | Path) -> dict:
    """The layout that :func:`compose` stored in a saved picture."""
    with Image.open(path) as picture:
        return json.loads(picture.text[LAYOUT_KEY])


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (no half-written file under its name), with the picture's layout, if any."""
    meta = PngInfo()
    if LAYOUT_KEY in image.info:
        meta.add_text(LAYOUT_KEY, image.info[LAYOUT_KEY], zip=True)
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=meta)


# ------------------------------------------------------------------------------------------------ what cells say
def score_chunks(scores: dict[str, float]) -> list[str]:
    """``["dino 0.104", "clip-i 0.442", ...]`` for the finite per-image scores, in :data:`CAPTION_METRICS` order."""
    return [
        f"{short} {scores[name]:.3f}"
        for name, short in CAPTION_METRICS.items()
        if name in scores and scores[name] is not None and math.isfinite(scores[name])
    ]


def record_caption(record: dict) -> list[str]:
    """What tells a render apart from its neighbours: its seed and, when metrics are on, its scores."""
    return [f"seed {record['seed']}", *score_chunks(record.get("scores", {}))]


def render_rows(records: list[dict]) -> list[Row]:
    """Rows = prompts (by ``prompt_index``), columns = samples (by ``image_index``), each cell captioned.

    Each record holds ``image`` (H, W, 3) uint8, ``prompt``, ``prompt_index``, ``image_index``, ``seed`` and,
    optionally, ``scores`` and ``is_class_prompt``.
    """
    columns = sorted({r["image_index"] for r in records})
    rows = []
    for index in sorted({r["prompt_index"] for r in records}):
        mine = {r["image_index"]: r for r in records if r["prompt_index"] == index}
        first = next(iter(mine.values()))
        label = first["prompt"] + (" (the class prompt)" if first.get("is_class_prompt") else "")
        cells = [Cell(mine[c]["image"], record_caption(mine[c])) if c in mine else None for c in columns]
        rows.append(Row(label, cells))
    return rows


def make_grid(
    records: list[dict], title: Sequence[str], cell_size: int = DEFAULT_CELL_SIZE, reference: Row | None = None
) -> Image.Image:
    """The grid of renders (see :func:`render_rows`), opened by the subject's photos when ``reference`` is given."""
    return compose(title, ([reference] if reference else []) + render_rows(records), cell_size)


def settings_line(settings: dict) -> str:
    """The sampler settings and LoRA scales of renders, from ``DreamBoothModule.render_settings()``."""
    parts = [
        f"{settings['sampler']}, {settings['num_inference_steps']} steps, CFG {settings['guidance_scale']:g}",
        f"{settings['width']}x{settings['height']} px",
    ]
    if settings.get("lora_scale") is not None:
        parts.append(
            f"LoRA scale UNet {settings['lora_scale']:g}, text encoder {settings['lora_text_encoder_scale']:g}"
        )
    else:
        parts.append("no LoRA")
    if settings.get("controlnet"):
        parts.append(f"ControlNet {settings['controlnet']} x {settings['controlnet_conditioning_scale']:g}")
    negative = settings.get("negative_prompt")
    parts.append(f"negative prompt: {negative!r}" if negative else "no negative prompt")
    return " | ".join(parts)


def model_line(settings: dict) -> str:
    """The model renders came from: the base model, and the LoRA weights when loaded from a file."""
    lora = settings.get("lora_weights")
    return f"model {settings['base_model']}" + (f" + LoRA {lora}" if lora else "")


# ------------------------------------------------------------------------------------------------ the subject
def reference_row(photos: Sequence[str | Path], resolution: int, note: str = "") -> Row:
    """The subject's photos as trained (the shorter side resized to ``resolution``, center-cropped; see
    :func:`~datamodules.datasets.as_trained`), each captioned with its file name; the first
    :data:`MAX_REFERENCE_PHOTOS` of them."""
    shown = list(photos)[:MAX_REFERENCE_PHOTOS]
    cells = [Cell(np.asarray(as_trained(load_image(p), resolution)), [Path(p).name]) for p in shown]
    count = f"{len(photos)} photos" if len(shown) == len(photos) else f"the first {len(shown)} of {len(photos)} photos"
    label = f"the subject: {count} as trained ({resolution} px, center crop{note})"
    return Row(label, cells, kind="reference")


# ------------------------------------------------------------------------------------------------ progress
def select_steps(steps: Sequence[int], max_columns: int = MAX_PROGRESS_COLUMNS) -> list[int]:
    """At most ``max_columns`` of the sorted ``steps``: the first, the last and evenly spaced ones between."""
    steps = sorted(steps)
    if len(steps) <= max_columns:
        return steps
    picks = {round(i * (len(steps) - 1) / (max_columns - 1)) for i in range(max_columns)}
    return [steps[i] for i in sorted(picks)]


def progress_rows(cells: dict[int, list[dict]], dino: dict[int, float]) -> list[Row]:
    """The progress strip's rows: a prompt per row, a validation step per column (see :func:`select_steps`).

    ``cells`` maps a step to that validation's strip records (``prompt_index``, ``prompt``, ``seed``, ``image``);
    ``dino`` maps a step to its ``val/dino`` (missing when metrics are off). Each cell is captioned with its step and
    ``val/dino``.
    """
    steps = select_steps(list(cells))
    prompts: dict[int, dict] = {}
    for step in steps:
        for record in cells[step]:
            prompts.setdefault(record["prompt_index"], record)
    rows = []
    for index in sorted(prompts):
        first = prompts[index]
        row = []
        for step in steps:
            record = next((r for r in cells[step] if r["prompt_index"] == index), None)
            caption = [f"step {step}"] + ([f"val/dino {dino[step]:.3f}"] if step in dino else [])
            row.append(Cell(record["image"], caption) if record is not None else None)
        rows.append(Row(f"{first['prompt']} (seed {first['seed']})", row, kind="progress"))
    return rows


def progress_title(steps: Sequence[int], shown: Sequence[int], settings: dict) -> list[str]:
    steps = sorted(steps)
    what = f"{len(steps)} validations" if len(shown) == len(steps) else f"{len(shown)} of {len(steps)} validations"
    return [
        f"progress: step {steps[0]} to step {steps[-1]} ({what})",
        "one render per prompt, the same seed at every validation; the step and val/dino under each",
        settings_line(settings),
    ]
