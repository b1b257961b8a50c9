"""The pictures, Lightning-free: cells at a size the eye can judge, cells placed by prompt and sample, captions, the
subject's photos as trained, the progress strip's columns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.pictures import (
    LAYOUT_KEY,
    MIN_CELL_SIZE,
    check_cell_size,
    fit_cell,
    make_grid,
    progress_rows,
    read_layout,
    reference_row,
    save_png_atomic,
    select_steps,
    thumbnail,
)
from datamodules.datasets import as_trained, image_transform
from datamodules.images import load_image


def _record(prompt_index, image_index, value, size=8):
    return {
        "image": np.full((size, size, 3), value, dtype=np.uint8),
        "prompt": f"prompt {prompt_index}",
        "prompt_index": prompt_index,
        "image_index": image_index,
        "seed": 1000 * prompt_index + image_index,
        "scores": {"dino": 0.25, "clip_i": float("nan")},
    }


@pytest.mark.parametrize(
    ("shape", "cell_size", "expected"),
    [
        ((32, 32), 256, (256, 256)),  # x 8
        ((64, 64), 256, (256, 256)),  # x 4
        ((64, 96), 256, (128, 192)),  # x 2: a whole factor, the longest side within the cell
        ((100, 100), 128, (200, 200)),  # x 2: never under 128 px
        ((512, 512), 256, (256, 256)),  # reduced
        ((512, 768), 256, (171, 256)),
    ],
)
def test_cells_are_enlarged_by_a_whole_factor_or_reduced(shape, cell_size, expected):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    before = image.copy()
    cell = np.asarray(fit_cell(image, cell_size))
    assert cell.shape[:2] == expected
    assert np.array_equal(image, before)  # the original is untouched
    if expected[0] > shape[0]:  # nearest neighbour: every pixel becomes a block of itself
        factor = expected[0] // shape[0]
        assert np.array_equal(cell, image.repeat(factor, axis=0).repeat(factor, axis=1))


def test_thumbnail_only_reduces():
    batch = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    kept = thumbnail(batch[1], 256)
    assert kept.shape == (32, 32, 3) and not np.shares_memory(kept, batch)  # a copy: the batch can be freed
    assert thumbnail(np.zeros((512, 256, 3), dtype=np.uint8), 256).shape == (256, 128, 3)


def test_cell_size_below_the_minimum_is_refused():
    with pytest.raises(ValueError, match=r"grid\.cell_size.*128"):
        check_cell_size(64, "grid.cell_size")
    assert check_cell_size(MIN_CELL_SIZE, "x") == MIN_CELL_SIZE


def test_cells_are_placed_by_prompt_and_sample_and_captioned(tmp_path):
    records = [_record(p, i, 10 * p + i + 1) for p in range(3) for i in range(2)][::-1]  # any order in
    path = tmp_path / "grid.png"
    save_png_atomic(make_grid(records, ["step 7"], cell_size=128), path)
    layout, grid = read_layout(path), np.asarray(Image.open(path))
    assert layout["title"] == ["step 7"] and [r["label"] for r in layout["rows"]] == [
        "prompt 0",
        "prompt 1",
        "prompt 2",
    ]
    for p, row in enumerate(layout["rows"]):
        for i, cell in enumerate(row["cells"]):
            x0, y0, x1, y1 = cell["box"]
            assert (x1 - x0, y1 - y0) == (128, 128)  # 8 px -> x 16
            assert (grid[y0:y1, x0:x1] == 10 * p + i + 1).all()
            assert cell["caption"] == [f"seed {1000 * p + i}, dino 0.250"]  # NaN scores are left out


def test_reference_row_shows_the_photos_as_trained(tmp_path):
    photo = tmp_path / "me.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(photo)
    state = torch.random.get_rng_state()
    row = reference_row([photo], 32)
    assert torch.equal(state, torch.random.get_rng_state())  # no random number drawn
    pixels = np.asarray(row.cells[0].image)
    trained = ((image_transform(32)(load_image(photo)) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert pixels.shape == (32, 32, 3) and np.abs(pixels.astype(float) - trained).max() <= 1
    assert np.array_equal(pixels, np.asarray(as_trained(load_image(photo), 32)))
    assert row.kind == "reference" and row.cells[0].caption == ["me.png"]
    assert row.label == "the subject: 1 photos as trained (32 px, center crop)"
    save_png_atomic(make_grid([_record(0, 0, 5)], ["t"], 256, row), tmp_path / "g.png")
    layout = read_layout(tmp_path / "g.png")
    assert [r["kind"] for r in layout["rows"]] == ["reference", "renders"]


def test_progress_strip_has_a_column_per_step():
    cells = {step: [{**_record(p, 0, step), "prompt": f"p{p}"} for p in range(2)] for step in (0, 5, 10)}
    rows = progress_rows(cells, {0: 0.1, 10: 0.3})
    assert [r.label for r in rows] == ["p0 (seed 0)", "p1 (seed 1000)"]
    assert [c.caption for c in rows[0].cells] == [
        ["step 0", "val/dino 0.100"],
        ["step 5"],
        ["step 10", "val/dino 0.300"],
    ]
    assert [int(np.asarray(c.image)[0, 0, 0]) for c in rows[1].cells] == [0, 5, 10]


def test_select_steps_keeps_first_and_last():
    assert select_steps([3, 1, 2]) == [1, 2, 3]
    picked = select_steps(list(range(0, 1000, 10)), 12)
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 990


def test_layout_chunk_is_in_the_png(tmp_path):
    save_png_atomic(make_grid([_record(0, 0, 1)], ["x"], 128), tmp_path / "a.png")
    assert LAYOUT_KEY in Image.open(tmp_path / "a.png").text
    assert Path(tmp_path / "a.png").stat().st_size > 0
