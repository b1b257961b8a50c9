"""Rendering settings and seeded rendering, Lightning-free; shared by validation, ``predict`` and ``test``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from core.errors import ConfigError
from sd.render.pipeline import SAMPLERS, SamplerName, prompt_embedding_kwargs


@dataclass(frozen=True)
class SamplingSettings:
    """How images are rendered.

    Args:
        num_images_per_prompt: Images per prompt (grid columns).
        negative_prompt: Text the sampler steers away from (classifier-free guidance); empty for none.
        guidance_scale: Classifier-free guidance scale; 1 disables guidance.
        num_inference_steps: Sampler steps.
        height: Image height in pixels (a multiple of 8); defaults to the training resolution.
        width: Image width in pixels (a multiple of 8); defaults to the training resolution.
        sampler: ``dpm++`` (DPM-Solver++ multistep), ``ddim``, ``euler_a`` (Euler ancestral) or ``pndm``.
        lora_scale: Strength of the UNet's LoRA update when rendering (0 renders the base UNet). Also the text
            encoder's, unless ``lora_text_encoder_scale`` is set.
        lora_text_encoder_scale: Strength of the text encoder's LoRA update (SDXL: both text encoders'); null uses
            ``lora_scale``. Both at 0 render the base model.
        controlnet_conditioning_scale: Weight of the ControlNet residuals (with ``model.controlnet``; 0 ignores the
            condition image).
    """

    num_images_per_prompt: int = 2
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    height: int | None = None
    width: int | None = None
    sampler: SamplerName = "dpm++"
    lora_scale: float = 1.0
    lora_text_encoder_scale: float | None = None
    controlnet_conditioning_scale: float = 1.0

    @property
    def text_encoder_scale(self) -> float:
        """The text encoder's LoRA scale: its own when set, else the UNet's."""
        return self.lora_scale if self.lora_text_encoder_scale is None else self.lora_text_encoder_scale

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"Unknown sampler {self.sampler!r}: choose one of {sorted(SAMPLERS)}.")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value <= 0 or value % 8):
                raise ConfigError(f"sampling.{side} must be a positive multiple of 8, got {value}.")
        if self.num_images_per_prompt <= 0 or self.num_inference_steps <= 0:
            raise ConfigError("sampling.num_images_per_prompt and sampling.num_inference_steps must be positive.")


def image_seed(prompt_seed: int, image_index: int) -> int:
    """The seed of one image: fixed per (prompt, column), so grids at different steps compare image by image."""
    return prompt_seed * 1000 + image_index


@torch.no_grad()
def render(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    settings: SamplingSettings,
    height: int,
    width: int,
    control_image: Tensor | None = None,
) -> Tensor:
    """Render one image per (prompt, seed) -> (N, 3, height, width) float in [0, 1].

    Each image's starting noise comes from its own CPU generator, so an image does not depend on the batch it is
    rendered in, on the device, or on the number of ranks.

    The pipeline would give the text encoder the UNet's LoRA scale (``cross_attention_kwargs["scale"]`` is passed on
    to ``encode_prompt``), so the prompts are encoded here with the text encoder's own scale and handed over as
    embeddings (SDXL: both encoders', and the pooled ones); the UNet's scale still goes through
    ``cross_attention_kwargs``. SDXL renders at any size with its size conditioning set to that size (original and
    target size ``height`` x ``width``, no crop), as ``StableDiffusionXLPipeline`` does.

    A VAE held in float32 (SDXL's own, which overflows in float16) beside a half-precision UNet decodes the latents in
    float32, autocast off.

    Args:
        control_image: (1, 3, H', W') float in [0, 1], the ControlNet condition of every image; needs a ControlNet
            pipeline (resized to ``height`` x ``width`` by it).
    """
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
    guided = settings.guidance_scale > 1
    embeds = prompt_embedding_kwargs(
        pipe.encode_prompt(
            prompt=prompts,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
            lora_scale=settings.text_encoder_scale,
        )
    )  # (N, 77, D) each, SDXL also (N, P) pooled; negative ones are None without guidance
    control = {}
    if control_image is not None:
        control = {"image": control_image, "controlnet_conditioning_scale": settings.controlnet_conditioning_scale}
    # A float32 VAE beside a half-precision UNet (or under autocast) decodes here, in float32: the pipeline would hand
    # it half-precision latents, or autocast would run it in half precision.
    half = torch.is_autocast_enabled(pipe._execution_device.type) or pipe.unet.dtype != torch.float32
    decode_here = pipe.vae.dtype == torch.float32 and half
    out = pipe(
        **embeds,
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        height=height,
        width=width,
        generator=generators,
        output_type="latent" if decode_here else "pt",
        cross_attention_kwargs={"scale": settings.lora_scale},
        **control,
    )
    if decode_here:  # the float32 VAE decodes in float32, not in autocast's half precision
        with torch.autocast(pipe._execution_device.type, enabled=False):
            latents = out.images.float() / pipe.vae.config.scaling_factor
            images = pipe.vae.decode(latents, return_dict=False)[0]
        return (images / 2 + 0.5).float().clamp(0, 1)  # (N, 3, H, W)
    return out.images.float().clamp(0, 1)  # (N, 3, H, W)
