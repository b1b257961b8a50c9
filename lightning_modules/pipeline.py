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
)

from lightning_modules.errors import ConfigError
from lightning_modules.sd_loading import SDComponents

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


def build_pipeline(
    parts: SDComponents, sampler: str = "dpm++", controlnet: ControlNetModel | None = None
) -> StableDiffusionPipeline | StableDiffusionControlNetPipeline:
    """Wrap the given modules (shared, not copied) in a text-to-image pipeline without a safety checker; with a
    ``controlnet``, a ControlNet pipeline around it."""
    extra = {} if controlnet is None else {"controlnet": controlnet}
    pipeline_class = StableDiffusionPipeline if controlnet is None else StableDiffusionControlNetPipeline
    pipe = pipeline_class(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=make_sampler(sampler, parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
