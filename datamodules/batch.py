"""The batch contract between the DataModule and the LightningModule.

The collate function produces exactly this; `DreamBoothModule.training_step` reads exactly this.
Which rows are prior-preservation (class) rows is said by an explicit mask, never by row order.
"""

from typing import TypedDict

from torch import Tensor


class DreamBoothBatch(TypedDict):
    """One training batch of instance rows and, with prior preservation, class rows."""

    pixel_values: Tensor  # (B, 3, H, W) float32 in [-1, 1]
    prompts: list[str]  # (B,) the caption of each row
    is_prior: Tensor  # (B,) bool: True for class-image (prior-preservation) rows
