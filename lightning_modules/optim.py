"""Optimizers and learning-rate schedules, Lightning-free."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from core.errors import ConfigError, MissingPackageError

OptimizerName = Literal[
    "adamw", "adamw8bit", "paged_adamw8bit", "lion", "lion8bit", "paged_lion8bit", "adafactor", "prodigy"
]
SchedulerName = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]
OPTIMIZERS: tuple[str, ...] = OptimizerName.__args__
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__
# bitsandbytes' optimizers by our name (its paged variants fall back to plain ones on the CPU, with a warning).
BNB_OPTIMIZERS = {
    "adamw8bit": "AdamW8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "lion": "Lion",
    "lion8bit": "Lion8bit",
    "paged_lion8bit": "PagedLion8bit",
}


def param_groups(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    learning_rate: float,
    text_encoder_lr: float | None,
    text_encoder_2: nn.Module | None = None,
    new_tokens: list[nn.Parameter] | None = None,
    new_token_lr: float | None = None,
) -> list[dict]:
    """One group per trained model, so the text encoders can have their own learning rate (None: not loaded; SDXL's
    second text encoder gets a group of its own, at the text encoders' rate), and one for the new tokens' embedding
    rows (pivotal tuning: each text encoder's), with theirs."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": learning_rate, "name": "unet"}]
    new_tokens = list(new_tokens or [])
    if new_tokens:
        groups.append({"params": new_tokens, "lr": new_token_lr or learning_rate, "name": "new_tokens"})
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        te_params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        te_params = [p for p in te_params if not any(p is q for q in new_tokens)]
        if te_params:
            lr = learning_rate if text_encoder_lr is None else text_encoder_lr
            groups.append({"params": te_params, "lr": lr, "name": name})
    if not groups[0]["params"]:
        raise ValueError("The UNet has no trainable parameter: nothing to optimize.")
    return groups


def check_optimizer_available(name: str) -> None:
    """Raise MissingPackageError at config time when ``name``'s package is not installed (Prodigy is optional)."""
    if name != "prodigy":
        return
    try:
        import prodigyopt  # noqa: F401
    except ImportError as err:
        raise MissingPackageError(
            "model.optimizer=prodigy needs the prodigyopt package, which is not among the locked dependencies: "
            "pip install prodigyopt (or pip install -e '.[prodigy]'), or choose another model.optimizer."
        ) from err


def check_schedule(warmup_steps: int, num_cycles: int, power: float) -> None:
    """Refuse schedule settings no schedule means."""
    if warmup_steps < 0:
        raise ConfigError(f"model.lr_warmup_steps must be >= 0, got {warmup_steps}.")
    if num_cycles < 1 or not power > 0:
        raise ConfigError(f"model.lr_num_cycles must be >= 1 and model.lr_power > 0, got {num_cycles} and {power}.")


def build_optimizer(
    name: OptimizerName,
    groups: list[dict],
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` (each with its own ``lr``), with the Adam-style settings given.

    - ``adamw``: torch's AdamW. ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes' (state in 8 bits; paged: state
      pages out to CPU memory under GPU memory pressure).
    - ``lion`` / ``lion8bit`` / ``paged_lion8bit`` (bitsandbytes): sign updates, one moment; usual settings a learning
      rate 3-10x smaller than AdamW's, weight decay 3-10x larger, betas (0.9, 0.99). ``eps`` is not used.
    - ``adafactor`` (transformers): factored second moments, with the given learning rate (``relative_step`` and
      ``scale_parameter`` off, as kohya and OneTrainer set it for fine-tuning); ``betas[0]`` is its beta1 (0: none);
      ``eps`` and ``betas[1]`` are not used.
    - ``prodigy`` (``pip install prodigyopt``): estimates the step size itself; usual learning rate 1.0 (a multiplier
      of that estimate), betas (0.9, 0.99), with bias correction and safeguard warmup on.
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name in BNB_OPTIMIZERS:
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - depends on the platform
            raise MissingPackageError(f"model.optimizer={name} needs bitsandbytes: pip install bitsandbytes") from err
        cls = getattr(bnb.optim, BNB_OPTIMIZERS[name])
        if "lion" in name:
            return cls(groups, betas=betas, weight_decay=weight_decay)
        return cls(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        beta1 = betas[0] or None
        return Adafactor(
            groups,
            lr=groups[0]["lr"],
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if name == "prodigy":
        check_optimizer_available(name)
        from prodigyopt import Prodigy

        return Prodigy(
            groups, betas=betas, weight_decay=weight_decay, eps=eps, use_bias_correction=True, safeguard_warmup=True
        )
    raise ConfigError(f"Unknown model.optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}.")


def build_lr_scheduler(
    name: SchedulerName,
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warmup, then diffusers' ``get_scheduler`` schedule of that name: constant, linear decay or cosine decay
    to 0 at ``total_steps``, cosine with ``num_cycles`` hard restarts, or polynomial decay of ``power`` to nearly 0
    (diffusers' lr_end 1e-7, which it takes relative to the optimizer's default rate)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"Unknown model.lr_scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}.")
    check_schedule(warmup_steps, num_cycles, power)
    diffusers_name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(
        diffusers_name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(total_steps, 1),
        num_cycles=num_cycles,
        power=power,
    )
