"""A text-to-image pipeline around the live (training) modules, for sampling without copying weights."""

from __future__ import annotations

from typing import Literal

from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

from core.errors import ConfigError
from sd.models.loading import SDComponents

SamplerName = Literal["ddim", "dpm++", "euler_a", "pndm"]
SAMPLERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
}


def make_sampler(name: str, scheduler_config: dict):
    """An inference scheduler built from the model's own noise-scheduler config."""
    if name not in SAMPLERS:
        raise ConfigError(f"Unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}.")
    # DDIM as StableDiffusionPipeline sets it up for SD 1.x configs (it patches clip_sample; other pipelines do not).
    overrides = {"clip_sample": False} if name == "ddim" else {}
    return SAMPLERS[name].from_config(scheduler_config, **overrides)


def prompt_embedding_kwargs(encoded: tuple) -> dict:
    """What a pipeline's ``encode_prompt`` returned, as keyword arguments of its ``__call__``: (prompt_embeds,
    negative_prompt_embeds), and for SDXL also (pooled_prompt_embeds, negative_pooled_prompt_embeds)."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return dict(zip(names, encoded, strict=False))


def build_pipeline(
    parts: SDComponents, sampler: str = "dpm++", controlnet: ControlNetModel | None = None
) -> (
    StableDiffusionPipeline
    | StableDiffusionXLPipeline
    | StableDiffusionControlNetPipeline
    | StableDiffusionXLControlNetPipeline
):
    """Wrap the given modules (shared, not copied) in the family's text-to-image pipeline (``Family.pipeline_class``:
    ``StableDiffusionPipeline`` without a safety checker, ``StableDiffusionXLPipeline`` without the watermark); with a
    ``controlnet``, the family's ControlNet pipeline (``Family.controlnet_pipeline_class``:
    ``StableDiffusionControlNetPipeline``, ``StableDiffusionXLControlNetPipeline``)."""
    family = parts.family
    pipeline_class = family.pipeline_type(controlnet=controlnet is not None)
    extra = {} if controlnet is None else {"controlnet": controlnet}
    modules = {"vae": parts.vae, "unet": parts.unet}
    modules |= {name: getattr(parts, name) for name in (*family.text_encoders, *family.tokenizers)}
    pipe = pipeline_class(
        scheduler=make_sampler(sampler, parts.noise_scheduler.config), **modules, **family.pipeline_options, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
