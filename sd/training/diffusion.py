"""The DreamBooth objective, Lightning-free: encode, noise, predict, compare.

Shapes: B rows (instance rows and class rows mixed, told apart by ``is_prior``), latents (B, 4, h, w)
with h = H / vae_scale_factor, text embeddings (B, 77, D) (SDXL: and pooled (B, P), see :class:`TextConditioning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from sd.models.families import Family


class LossTerms(NamedTuple):
    """The total loss and its two parts (each a scalar tensor)."""

    loss: Tensor  # instance + prior_loss_weight * prior
    instance: Tensor  # mean squared error over instance rows
    prior: Tensor  # mean squared error over class rows (0 when the batch has none)


def dreambooth_loss(
    model_pred: Tensor,
    target: Tensor,
    is_prior: Tensor,
    prior_loss_weight: float,
    loss_weight: Tensor | None = None,
    row_weights: Tensor | None = None,
) -> LossTerms:
    """MSE over instance rows + ``prior_loss_weight`` x MSE over class rows.

    Args:
        model_pred: (B, C, h, w) UNet output.
        target: (B, C, h, w) noise (epsilon) or velocity (v_prediction).
        is_prior: (B,) bool, True for class (prior-preservation) rows.
        prior_loss_weight: weight of the class rows' term; 0 gives plain fine-tuning on the instance rows.
        loss_weight: (B, 1, H, W) per-pixel weights in [0, 1] (loss masks; ones on class rows), or None. They are
            averaged down to the latent grid (h, w) (at (h, w) already, as the latent cache holds them, they stay as
            they are), and each row's error is their weighted mean.
        row_weights: (B,) float weight of each row's mean squared error (min-SNR: ``loss_recipes.loss_row_weights``),
            instance and class rows alike; None weighs every row 1.
    """
    if is_prior.dtype != torch.bool or is_prior.shape != model_pred.shape[:1]:
        raise ValueError(f"is_prior must be a bool mask of shape ({model_pred.shape[0]},), got {tuple(is_prior.shape)}")
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    if loss_weight is None:
        per_row = error.mean(dim=(1, 2, 3))  # (B,)
    else:
        w = F.adaptive_avg_pool2d(loss_weight.float().to(error.device), error.shape[-2:])  # (B, 1, h, w)
        per_row = (error * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3)).clamp_min(1e-8)  # (B,)
    if row_weights is not None:
        per_row = per_row * row_weights.to(per_row)
    zero = per_row.new_zeros(())
    instance = per_row[~is_prior].mean() if (~is_prior).any() else zero
    prior = per_row[is_prior].mean() if is_prior.any() else zero
    return LossTerms(instance + prior_loss_weight * prior, instance, prior)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixel_values: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 4, H/f, W/f) latents, sampled and scaled by the VAE's scaling factor."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    return dist.sample(generator) * vae.config.scaling_factor


def sample_latents(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw latents from a cached latent distribution: ``mean + std * randn``, as ``latent_dist.sample()`` draws them.

    ``mean`` and ``std`` (B, 4, h, w) are already scaled by the VAE's scaling factor, so for the same random draw
    this equals :func:`encode_latents` of the same pixels (up to float rounding).
    """
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # (B, 4, h, w)
    return mean + std * noise


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
    """Prompts -> (B, 77) token ids, padded and truncated the Stable Diffusion way."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(text_encoder: CLIPTextModel, input_ids: Tensor) -> Tensor:
    """(B, 77) token ids -> (B, 77, D) last hidden states, the UNet's cross-attention context."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


class TextConditioning(NamedTuple):
    """What the text encoders give the UNet for B prompts."""

    context: Tensor  # (B, 77, D) cross-attention context (SDXL: both encoders' penultimate states, D = 768 + 1280)
    pooled: Tensor | None  # (B, P) the last encoder's pooled, projected embedding (SDXL's added conditioning), or None


def encode_prompts(
    family: Family, tokenizers: Sequence[CLIPTokenizer], text_encoders: Sequence[nn.Module], prompts: list[str]
) -> TextConditioning:
    """Prompts -> the UNet's text conditioning, as the family's pipeline makes it (``Family.text_context``).

    ``last``: the one encoder's last hidden states (:func:`encode_text`). ``penultimate`` (SDXL, as
    ``StableDiffusionXLPipeline.encode_prompt`` without ``clip_skip``): each encoder's penultimate hidden states,
    concatenated on the feature axis, and the pooled output (``text_embeds``) of the last encoder.
    """
    if family.text_context == "last":
        (tokenizer,), (text_encoder,) = tokenizers, text_encoders
        return TextConditioning(encode_text(text_encoder, tokenize(tokenizer, prompts)), None)
    states, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        out = text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (B, 77, D_i)
        pooled = out[0]  # CLIPTextModelWithProjection: (B, P) text_embeds; the last encoder's is kept
    return TextConditioning(torch.cat(states, dim=-1), pooled)


def unread_text_encoder_parts(family: Family, text_encoders: Sequence[nn.Module]) -> list[nn.Module]:
    """The parts of the text encoders that :func:`encode_prompts` never reads for this family, so that nothing trains
    there (no gradient would reach them: DDP refuses such parameters, and training them would be wasted).

    ``penultimate`` (SDXL): each encoder but the last gives only its penultimate hidden states, so its last layer and
    final layer norm are unread; the last encoder's are read by its pooled output. ``last``: everything is read.
    """
    if family.text_context != "penultimate":
        return []
    unread = []
    for text_encoder in text_encoders[:-1]:
        model = getattr(text_encoder, "text_model", text_encoder)  # transformers >= 5.6 flattened CLIPTextModel
        unread += [model.encoder.layers[-1], model.final_layer_norm]
    return unread


def time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL's size conditioning per row: (original h, original w, crop top, crop left, target h, target w).

    Args:
        original_sizes: (B, 2) long, each photo's (height, width) as read, before resizing.
        crop_top_lefts: (B, 2) long, (top, left) of the crop in the resized photo.
        target_size: (height, width) of the training images.
    """
    target = torch.tensor(target_size, device=original_sizes.device).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)  # (B, 6)


def unet_conditioning(
    family: Family, text: TextConditioning, sizes: tuple[Tensor, Tensor] | None, target_size: tuple[int, int]
) -> dict:
    """The UNet's keyword arguments besides the context: none, or SDXL's ``added_cond_kwargs`` (``text_time``)."""
    if family.added_conditioning is None:
        return {}
    if sizes is None:
        raise ValueError("SDXL's added conditioning needs original_sizes and crop_top_lefts in the batch.")
    ids = time_ids(*sizes, target_size).to(text.context.device, text.context.dtype)
    return {"added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": ids}}


def diffusion_target(noise_scheduler: DDPMScheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet is trained to predict, read from the scheduler config: epsilon or velocity."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r} in the scheduler config.")


def add_noise(noise_scheduler: DDPMScheduler, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Draw noise and timesteps for each row; return (noisy_latents, noise, timesteps)."""
    # Drawn in logical order, not randn_like: the VAE may return channels-last latents, and the same seed must give
    # the same noise whatever the memory layout (cached and encoded latents train identically).
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # (B, 4, h, w)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()  # (B,)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


@torch.no_grad()
def fixed_noise_error(
    unet,
    text_encoder,
    tokenizer: CLIPTokenizer,
    noise_scheduler: DDPMScheduler,
    latents: Tensor,
    prompt: str,
    seed: int,
    min_timestep: int = 0,
) -> float:
    """Denoising error of ``prompt`` on ``latents`` (N, 4, h, w) for noise and timesteps drawn from ``seed``.

    The same seed gives the same draws, so two models (or two prompts) are compared on identical inputs. A high
    ``min_timestep`` measures where the noisy input hides the image and the prompt must say what to denoise toward.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents)
    max_t = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(min_timestep, max_t, (latents.shape[0],), generator=g)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    context = encode_text(text_encoder, tokenize(tokenizer, [prompt] * latents.shape[0]))
    pred = unet(noisy, timesteps, context).sample
    return F.mse_loss(pred.float(), diffusion_target(noise_scheduler, latents, noise, timesteps).float()).item()
