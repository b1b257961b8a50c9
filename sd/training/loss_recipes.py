"""Loss recipes the field uses, Lightning-free: min-SNR weighting, offset noise, input perturbation.

Each is off at its default, and then the training step draws and computes exactly what it did without them
(``draw_noisy_inputs`` calls :func:`sd.training.diffusion.add_noise`, no weight reaches the loss).
Shapes: latents (B, 4, h, w), timesteps (B,).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from core.errors import ConfigError
from sd.training.diffusion import add_noise


class LossRecipe(NamedTuple):
    """The loss options of ``model``: ``snr_gamma`` None, ``noise_offset`` 0 and ``input_perturbation`` 0 are off."""

    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    def check(self) -> LossRecipe:
        """Refuse values no recipe means (at config time)."""
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(
                f"model.snr_gamma must be > 0 (5 is the usual value) or null for off, got {self.snr_gamma}."
            )
        if not self.noise_offset >= 0:
            raise ConfigError(
                f"model.noise_offset must be >= 0 (0.05-0.1 are usual; 0 is off), got {self.noise_offset}."
            )
        if not self.input_perturbation >= 0:
            raise ConfigError(
                f"model.input_perturbation must be >= 0 (0.1 is usual; 0 is off), got {self.input_perturbation}."
            )
        return self


def draw_noisy_inputs(
    noise_scheduler: DDPMScheduler, latents: Tensor, recipe: LossRecipe
) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy_latents, noise, timesteps), as :func:`add_noise` draws them, with the recipe's changes.

    - ``noise_offset`` (Guttenberg's offset noise, as diffusers' and kohya's scripts add it): each row and channel's
      noise gets ``noise_offset * N(0, 1)`` added uniformly over the image, so the model learns to change an image's
      mean brightness (very dark or bright renders). The target is this offset noise.
    - ``input_perturbation`` (Ning et al. 2023, diffusers' ``--input_perturbation``): the UNet's input is noised with
      ``noise + input_perturbation * N(0, 1)`` while the target stays ``noise``, against exposure bias.
    """
    if not recipe.noise_offset and not recipe.input_perturbation:
        return add_noise(noise_scheduler, latents)  # bitwise the plain draws
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # (B, 4, h, w)
    if recipe.noise_offset:
        noise = noise + recipe.noise_offset * torch.randn((b, c, 1, 1), device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device).long()  # (B,)
    model_noise = noise
    if recipe.input_perturbation:
        extra = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        model_noise = noise + recipe.input_perturbation * extra
    return noise_scheduler.add_noise(latents, model_noise, timesteps), noise, timesteps


def compute_snr(noise_scheduler: DDPMScheduler, timesteps: Tensor) -> Tensor:
    """(B,) signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each row's timestep (float32)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]  # (B,)
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: Tensor, snr_gamma: float) -> Tensor:
    """(B,) per-row loss weights of Min-SNR-gamma (Hang et al. 2023), the form kohya's and diffusers' scripts use.

    The paper weights the x0 loss by min(SNR, gamma); in terms of the trained target this is
    min(SNR, gamma) / SNR for epsilon prediction and min(SNR, gamma) / (SNR + 1) for v-prediction. The epsilon form
    is computed as min(1, gamma / SNR), the same number, which stays finite at SNR = 0 (a zero-terminal-SNR schedule's
    last timestep, weight 1).
    """
    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.minimum(snr, torch.full_like(snr, snr_gamma)) / (snr + 1.0)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config.")


def loss_row_weights(noise_scheduler: DDPMScheduler, timesteps: Tensor, recipe: LossRecipe) -> Tensor | None:
    """(B,) weights of each row's squared error, or None (every row weighs 1: the plain mean)."""
    if recipe.snr_gamma is None:
        return None
    return min_snr_weights(noise_scheduler, timesteps, recipe.snr_gamma)
