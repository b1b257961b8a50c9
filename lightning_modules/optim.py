"""Optimizers and learning-rate schedules, Lightning-free."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from lightning_modules.errors import ConfigError, MissingPackageError

OptimizerName = Literal["adamw", "adamw8bit"]
SchedulerName = Literal["constant", "linear", "cosine"]


def param_groups(
    unet: nn.Module, text_encoder: nn.Module | None, learning_rate: float, text_encoder_lr: float | None
) -> list[dict]:
    """One group per trained model, so the text encoder can have its own learning rate (None: not loaded)."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": learning_rate, "name": "unet"}]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad] if text_encoder is not None else []
    if te_params:
        lr = learning_rate if text_encoder_lr is None else text_encoder_lr
        groups.append({"params": te_params, "lr": lr, "name": "text_encoder"})
    if not groups[0]["params"]:
        raise ValueError("The UNet has no trainable parameter: nothing to optimize.")
    return groups


def build_optimizer(
    name: OptimizerName,
    groups: list[dict],
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: about 4x less memory for it)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - depends on the platform
            raise MissingPackageError("model.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    raise ConfigError(f"Unknown model.optimizer {name!r}: choose 'adamw' or 'adamw8bit'.")


def build_lr_scheduler(
    name: SchedulerName, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, linear decay or cosine decay to 0 at ``total_steps``, each after a linear warmup."""
    if name not in ("constant", "linear", "cosine"):
        raise ConfigError(f"Unknown model.lr_scheduler {name!r}: choose 'constant', 'linear' or 'cosine'.")
    if warmup_steps < 0:
        raise ConfigError(f"model.lr_warmup_steps must be >= 0, got {warmup_steps}.")
    diffusers_name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(
        diffusers_name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
