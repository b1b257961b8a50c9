"""Guards against non-finite numbers (a diverged run), Lightning-free.

A NaN or infinite loss either stops the run with an error that names the step (``nan_policy="stop"``) or skips
that optimizer step (``"skip"``); weights that hold NaN or infinity are never written over a good checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

NanPolicy = Literal["stop", "skip"]


class NonFiniteLossError(FloatingPointError):
    """The training loss is NaN or infinite; the message names the step."""


class NonFiniteWeightsError(FloatingPointError):
    """Trained weights hold NaN or infinity; they are not saved."""


def non_finite_loss_message(step: int, epoch: int, batch_idx: int, terms: Mapping[str, Tensor]) -> str:
    """Says where the loss went non-finite and what each term was."""
    parts = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items())
    return (
        f"Non-finite training loss at optimizer step {step} (epoch {epoch}, batch {batch_idx}): {parts}. "
        "Common causes: a learning rate too high for the model, float16 overflow (try bf16-mixed or a lower "
        "learning rate), or a corrupt input. The last checkpoint holds the last good weights: resume from it with "
        "--model.nan_policy=skip to skip such steps, or start again with a lower learning rate (resuming restores "
        "the checkpoint's learning rate and other model options)."
    )


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor that holds NaN or infinity, or None when all are finite."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_finite_weights(tensors: Mapping[str, Tensor], step: int) -> None:
    """Raise :class:`NonFiniteWeightsError` when a trained weight is not finite, before it can be saved."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteWeightsError(
            f"Not saving a checkpoint at step {step}: the trained weight {bad} holds NaN or infinite values (the run "
            "diverged). The previous checkpoint is kept; resume from it with a lower learning rate."
        )
