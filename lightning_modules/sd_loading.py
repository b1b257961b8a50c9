"""Loading the parts of a Stable Diffusion 1.x model, Lightning-free.

Every caller (training, class-image generation, rendering, tests, the demo) goes through these
functions, so a hub id, a local diffusers folder and a built-in tiny model all take one code path:
a built-in name (``builtin:tiny-sd``) only resolves to a local diffusers folder first. A single-file
checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only``) goes through diffusers'
``from_single_file`` instead, with its configs from ``single_file_config`` (see :mod:`lightning_modules.single_file`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_modules.builtin_models import resolve_pretrained
from lightning_modules.single_file import SINGLE_FILE_SUFFIXES, is_single_file, load_single_file_pipeline


@dataclass
class SDComponents:
    """The pieces of Stable Diffusion that training drives."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def check_model_path(pretrained_model_name_or_path: str) -> str:
    """Resolve built-in names and fail early, with a clear message, on a local path that is no model."""
    path = resolve_pretrained(pretrained_model_name_or_path)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or is_single_file(path)
    if looks_local:
        if os.path.isfile(path):
            if not is_single_file(path):
                raise ValueError(
                    f"model.pretrained_model_name_or_path: {path!r} is a file but no single-file checkpoint; give a "
                    f"{' / '.join(SINGLE_FILE_SUFFIXES)} file or a diffusers folder."
                )
            return path
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model.pretrained_model_name_or_path: {path!r} does not exist. Give a hub id "
                "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers folder, a single-file "
                "checkpoint (.safetensors), or builtin:tiny-sd."
            )
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(
                f"model.pretrained_model_name_or_path: {path!r} is not a diffusers model folder (no model_index.json). "
                "Point it at a folder written by `save_pretrained` or a hub id."
            )
    return path


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler, all in float32.

    ``single_file_config`` (a diffusers folder or hub id describing the architecture) is used only when the model is
    a single-file checkpoint; ``revision`` and ``variant`` only when it is not.
    """
    path = check_model_path(pretrained_model_name_or_path)
    if os.path.isfile(path):
        pipe = load_single_file_pipeline(path, single_file_config)
        return SDComponents(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        )
    kw = {"revision": revision}
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
    **components: torch.nn.Module,
) -> StableDiffusionPipeline:
    """Load a whole text-to-image pipeline (no safety checker: research use, images stay local).

    ``components`` (e.g. a trained ``unet``) are used as given instead of being loaded.
    """
    path = check_model_path(pretrained_model_name_or_path)
    if os.path.isfile(path):
        return load_single_file_pipeline(path, single_file_config, torch_dtype, **components)
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        revision=revision,
        variant=variant,
        dtype=torch_dtype,
        safety_checker=None,
        requires_safety_checker=False,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
