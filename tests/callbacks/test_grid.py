"""The grid image: rows are prompts, columns are samples, cells hold the right renders."""

import numpy as np

from callbacks.grid import LABEL_HEIGHT, make_grid


def _record(prompt_index, image_index, value):
    image = np.full((8, 8, 3), value, dtype=np.uint8)
    return {
        "image": image,
        "prompt": f"prompt {prompt_index}",
        "prompt_index": prompt_index,
        "image_index": image_index,
    }


def test_cells_are_placed_by_prompt_and_sample():
    records = [_record(p, i, 10 * p + i + 1) for p in range(3) for i in range(2)][::-1]  # any order in
    grid = np.asarray(make_grid(records, "step 7"))
    for p in range(3):
        top = LABEL_HEIGHT + p * (LABEL_HEIGHT + 8) + LABEL_HEIGHT
        for i in range(2):
            assert (grid[top : top + 8, i * 8 : (i + 1) * 8] == 10 * p + i + 1).all()
