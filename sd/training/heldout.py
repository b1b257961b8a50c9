"""The held-out loss (``data.holdout``), Lightning-free: a fixed-noise denoising loss, the same inputs at every
validation, so that its curve over a run compares like with like (an overfitting curve beside the renders).

Each photo is encoded once (the VAE's latent mean, no sampling) and denoised at ``TIMESTEPS_PER_PHOTO`` fixed
timesteps spread over the schedule (the midpoints of equal bins), each with its own noise drawn from a generator
seeded with the given seed. Nothing here draws from the global random state, so computing it leaves training as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import ConfigError
from sd.training.diffusion import diffusion_target

TIMESTEPS_PER_PHOTO = 4  # t = 125, 375, 625, 875 of 1000
MIN_TRAINING_PHOTOS = 3  # holding out may not leave fewer; else the loss runs on the training photos
HELDOUT_SEED = 0  # of the fixed noise: the same in every run, so runs compare too


class HeldOutSet(NamedTuple):
    """The photos the held-out loss is measured on."""

    pixels: Tensor  # (N, 3, H, W) in [-1, 1], center-cropped at the training resolution, not flipped
    prompts: list[str]  # (N,) each photo's caption, or the instance prompt
    on_training_photos: bool  # too few photos to hold any out: the training photos themselves (a fit curve)


class HeldOutInputs(NamedTuple):
    """Fixed inputs of the held-out loss: one row per (photo, timestep)."""

    latents: Tensor  # (N*K, 4, h, w) latent means, scaled
    noise: Tensor  # (N*K, 4, h, w)
    timesteps: Tensor  # (N*K,) long
    prompts: list[str]  # (N*K,)


def holdout_count(holdout: int | float | None, num_photos: int) -> int:
    """How many photos ``data.holdout`` holds out of ``num_photos``: a count (an int >= 1) or a fraction in (0, 1)
    (rounded, at least 1); 0 when off (None)."""
    if holdout is None:
        return 0
    if isinstance(holdout, float) and not holdout.is_integer():
        return max(1, round(holdout * num_photos))
    return int(holdout)


def check_holdout(holdout: int | float | None) -> None:
    """A count >= 1 or a fraction strictly between 0 and 1; raises ConfigError naming ``data.holdout`` otherwise."""
    if holdout is None:
        return
    fraction = isinstance(holdout, float) and not holdout.is_integer()
    if (fraction and not 0.0 < holdout < 1.0) or (not fraction and holdout < 1):
        raise ConfigError(
            f"data.holdout must be a number of photos (1, 2, ...) or a fraction between 0 and 1 (0.2), got {holdout}; "
            "null turns the held-out loss off."
        )


def split_holdout(photos: list, count: int) -> tuple[list, list, bool]:
    """(training photos, held-out photos, on_training_photos): the last ``count`` photos (in name order) held out,
    unless that leaves fewer than ``MIN_TRAINING_PHOTOS``: then none is, and the loss runs on all of them."""
    if count <= 0:
        return list(photos), [], False
    if len(photos) - count < MIN_TRAINING_PHOTOS:
        return list(photos), list(photos), True
    return list(photos[:-count]), list(photos[-count:]), False


def fixed_timesteps(num_train_timesteps: int, k: int = TIMESTEPS_PER_PHOTO) -> Tensor:
    """(k,) the midpoints of k equal bins of the schedule."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()


@torch.no_grad()
def heldout_inputs(vae, noise_scheduler, heldout: HeldOutSet, seed: int) -> HeldOutInputs:
    """Encode the photos and draw the fixed noise (CPU generator seeded with ``seed``), one row per photo and
    timestep; on the VAE's device, float32."""
    device = vae.device
    latents = vae.encode(heldout.pixels.to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    steps = fixed_timesteps(noise_scheduler.config.num_train_timesteps)  # (K,)
    k = len(steps)
    latents = latents.repeat_interleave(k, dim=0)  # (N*K, 4, h, w)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(device)
    timesteps = steps.repeat(len(heldout.prompts)).to(device)  # photo i rows: t_0 .. t_{K-1}
    prompts = [p for p in heldout.prompts for _ in range(k)]
    return HeldOutInputs(latents, noise, timesteps, prompts)


@torch.no_grad()
def heldout_loss(
    denoise: Callable[[Tensor, Tensor, list[str]], Tensor],
    noise_scheduler,
    inputs: HeldOutInputs,
    batch_size: int = 8,
) -> Tensor:
    """Mean squared error of the prediction (epsilon or v, as trained) over all fixed rows: a scalar tensor.

    ``denoise(noisy_latents, timesteps, prompts)`` is the model's prediction (the module's UNet with its text
    conditioning), so this stays independent of the model family.
    """
    total, rows = 0.0, inputs.latents.shape[0]
    for start in range(0, rows, batch_size):
        sl = slice(start, start + batch_size)
        latents, noise, timesteps = inputs.latents[sl], inputs.noise[sl], inputs.timesteps[sl]
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = denoise(noisy, timesteps, inputs.prompts[sl])
        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
        total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
    return torch.tensor(total / inputs.latents.numel())
