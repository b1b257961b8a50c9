"""Loading the parts of a Stable Diffusion model (1.x, 2.x or SDXL: :mod:`sd.models.families`), Lightning-free.

Every caller (training, class-image generation, rendering, tests, the demo) goes through these
functions, so a hub id, a local diffusers folder and a built-in tiny model all take one code path:
a built-in name (``builtin:tiny-sd``) only resolves to a local diffusers folder first. A single-file
checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only``) goes through diffusers'
``from_single_file`` instead, with its configs from ``single_file_config`` (see :mod:`sd.models.single_file`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from core.errors import InputFileError, InputNotFoundError
from sd.models.builtin import resolve_pretrained
from sd.models.families import SD1, Family, family_of_folder, family_of_hub_id, family_of_keys
from sd.models.single_file import (
    SINGLE_FILE_SUFFIXES,
    is_single_file,
    load_single_file_pipeline,
    read_checkpoint_keys,
    read_checkpoint_shape,
)


@dataclass
class SDComponents:
    """The pieces of Stable Diffusion that training drives."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None  # None while a frozen text encoder is not loaded (cached text embeddings)
    vae: AutoencoderKL | None  # None while not loaded (cached latents)
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    family: Family = SD1
    # SDXL's second text encoder (OpenCLIP bigG with projection) and its tokenizer; None for other families, or while
    # not loaded.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    vae_scale_factor: int = field(default=8)  # pixels per latent, from the VAE's config (read where it is needed)

    def tokenizer_list(self) -> list[CLIPTokenizer]:
        """The tokenizer of each of the family's text encoders, in order."""
        return [getattr(self, name) for name in self.family.tokenizers]

    def text_encoder_list(self) -> list[nn.Module | None]:
        """The family's text encoders, in order (None where not loaded)."""
        return [getattr(self, name) for name in self.family.text_encoders]


def check_model_path(pretrained_model_name_or_path: str, revision: str | None = None) -> str:
    """Resolve built-in names and fail early, with a clear message, on a path that is no model we train.

    A local path that is no model, and a model of a family this project does not train (SDXL, SD 3, Flux, an
    inpainting UNet, ...; :func:`sd.models.families.detect_family`), are refused before any weights load.
    """
    path = _check_local_path(resolve_pretrained(pretrained_model_name_or_path))
    detect_family(path, revision)
    return path


def detect_family(path: str, revision: str | None = None) -> Family | None:
    """The family of a resolved model path: a diffusers folder, a single file, or a hub id (None if not at hand).

    Raises :class:`sd.models.families.UnsupportedModelError` for a model of a family this project does not
    train.
    """
    if os.path.isdir(path):
        return family_of_folder(path)
    if os.path.isfile(path) and is_single_file(path):
        return family_of_keys(read_checkpoint_keys(path), repr(path), lambda key: read_checkpoint_shape(path, key))
    if os.path.exists(path):
        return None
    return family_of_hub_id(path, revision)


def _check_local_path(path: str) -> str:
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or is_single_file(path)
    if looks_local:
        if os.path.isfile(path):
            if not is_single_file(path):
                raise InputFileError(
                    f"model.pretrained_model_name_or_path: {path!r} is a file but no single-file checkpoint; give a "
                    f"{' / '.join(SINGLE_FILE_SUFFIXES)} file or a diffusers folder."
                )
            return path
        if not os.path.isdir(path):
            raise InputNotFoundError(
                f"model.pretrained_model_name_or_path: {path!r} does not exist. Give a hub id "
                "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers folder, a single-file "
                "checkpoint (.safetensors), or builtin:tiny-sd."
            )
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise InputFileError(
                f"model.pretrained_model_name_or_path: {path!r} is not a diffusers model folder (no model_index.json). "
                "Point it at a folder written by `save_pretrained` or a hub id."
            )
    return path


# The loadable parts: name -> (class, subfolder).
PART_CLASSES = {
    "tokenizer": CLIPTokenizer,
    "tokenizer_2": CLIPTokenizer,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
    "vae": AutoencoderKL,
    "unet": UNet2DConditionModel,
    "noise_scheduler": DDPMScheduler,
}
PART_SUBFOLDERS = {"noise_scheduler": "scheduler"}
WEIGHTED_PARTS = ("text_encoder", "text_encoder_2", "vae", "unet")  # the parts with weight files (and a ``variant``)


def load_parts(
    pretrained_model_name_or_path: str,
    parts: list[str] | tuple[str, ...],
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    vae: str | None = None,
) -> dict:
    """Load some parts (``tokenizer``, ``text_encoder``, ``vae``, ``unet``, ``noise_scheduler``; SDXL's
    ``tokenizer_2`` and ``text_encoder_2``), in float32.

    A single-file checkpoint holds every part, so it is read once for all of them; ``single_file_config`` (a
    diffusers folder or hub id describing the architecture) is used only then, ``revision`` and ``variant`` only
    otherwise. ``vae``: another VAE (a diffusers VAE folder or hub id, ``model.vae``) loaded instead of the model's.
    """
    path = check_model_path(pretrained_model_name_or_path, revision)  # fail early, before any part loads
    loaded = {}
    if vae and "vae" in parts:
        loaded["vae"] = load_vae(vae)
        parts = [p for p in parts if p != "vae"]
    if os.path.isfile(path):
        pipe = load_single_file_pipeline(path, single_file_config)
        return loaded | {
            part: DDPMScheduler.from_config(pipe.scheduler.config) if part == "noise_scheduler" else getattr(pipe, part)
            for part in parts
        }
    for part in parts:
        kw = {"subfolder": PART_SUBFOLDERS.get(part, part), "revision": revision}
        if part in WEIGHTED_PARTS:
            kw["variant"] = variant
        loaded[part] = PART_CLASSES[part].from_pretrained(path, **kw)
    return loaded


def check_vae_path(vae: str) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of a separate VAE (``model.vae``), without loading it; a local path that holds no
    VAE fails here, naming the option. Built-in names resolve (and build) first."""
    path = resolve_pretrained(vae)
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if not looks_local:
        return path, None  # a hub id
    if not os.path.exists(path):
        raise InputNotFoundError(f"model.vae: {vae!r} does not exist; give a diffusers VAE folder or a hub id.")
    if not os.path.isdir(path):
        raise InputFileError(f"model.vae: {vae!r} is a file; give a diffusers VAE folder (config.json) or a hub id.")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    if os.path.isfile(os.path.join(path, "vae", "config.json")):
        return path, "vae"  # a whole diffusers model: its VAE
    raise InputFileError(f"model.vae: {vae!r} holds no VAE (no config.json, nor vae/config.json).")


def load_vae(vae: str) -> AutoencoderKL:
    """A separate VAE (``model.vae``): a diffusers VAE folder (``config.json`` and weights), a hub id such as
    ``madebyollin/sdxl-vae-fp16-fix``, or a diffusers model folder / ``builtin:<name>`` whose ``vae/`` is taken."""
    path, subfolder = check_vae_path(vae)
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder)


def vae_scale_factor(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    vae: str | None = None,
    single_file_config: str | None = None,
) -> int:
    """Pixels per latent of the model's VAE (or of ``vae``), read from its config without loading weights; 8 (every
    released Stable Diffusion VAE's) when the config cannot be had."""
    if vae:
        path, subfolder = check_vae_path(vae)
    else:
        path, subfolder = check_model_path(pretrained_model_name_or_path, revision), "vae"
        if os.path.isfile(path):  # a single file: the configs it is read with
            family = detect_family(path) or SD1
            path = resolve_pretrained(single_file_config or family.single_file_config)
    try:
        config = AutoencoderKL.load_config(path, subfolder=subfolder, revision=None if vae else revision)
    except (OSError, ValueError):
        return 8
    return 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)


def load_part(
    pretrained_model_name_or_path: str,
    part: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
):
    """Load one part, in float32 (see :func:`load_parts`)."""
    return load_parts(pretrained_model_name_or_path, [part], revision, variant, single_file_config)[part]


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    with_vae: bool = True,
    with_text_encoder: bool = True,
    vae: str | None = None,
) -> SDComponents:
    """Load the tokenizers, text encoders, VAE, UNet and the training noise scheduler, all in float32.

    ``with_vae`` / ``with_text_encoder`` false leave those parts ``None`` (not loaded), for training on cached
    latents / text embeddings (``with_text_encoder`` covers each of the family's text encoders). ``vae``: another
    VAE than the model's (``model.vae``).
    """
    family = detect_family(check_model_path(pretrained_model_name_or_path, revision), revision) or SD1
    names = [*family.tokenizers, "unet", "noise_scheduler"] + ["vae"] * with_vae
    names += list(family.text_encoders) * with_text_encoder
    loaded = load_parts(pretrained_model_name_or_path, names, revision, variant, single_file_config, vae)
    factor = 8  # only a UNet with added size conditioning (SDXL) needs the image size of its latents
    if "vae" in loaded:
        factor = 2 ** (len(loaded["vae"].config.block_out_channels) - 1)
    elif family.added_conditioning is not None:
        factor = vae_scale_factor(pretrained_model_name_or_path, revision, vae, single_file_config)
    return SDComponents(
        tokenizer=loaded["tokenizer"],
        text_encoder=loaded.get("text_encoder"),
        vae=loaded.get("vae"),
        unet=loaded["unet"],
        noise_scheduler=loaded["noise_scheduler"],
        family=family,
        text_encoder_2=loaded.get("text_encoder_2"),
        tokenizer_2=loaded.get("tokenizer_2"),
        vae_scale_factor=factor,
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
    vae: str | None = None,
    **components: torch.nn.Module,
) -> StableDiffusionPipeline:
    """Load a whole text-to-image pipeline of the model's family (``StableDiffusionPipeline`` without a safety
    checker: research use, images stay local; ``StableDiffusionXLPipeline`` without the invisible watermark).

    ``components`` (e.g. a trained ``unet``) are used as given instead of being loaded; ``vae`` is another VAE than
    the model's (``model.vae``).
    """
    path = check_model_path(pretrained_model_name_or_path, revision)
    if vae and "vae" not in components:
        components["vae"] = load_vae(vae).to(torch_dtype)
    if os.path.isfile(path):
        return load_single_file_pipeline(path, single_file_config, torch_dtype, **components)
    family = detect_family(path, revision) or SD1
    options = {k: v for k, v in family.pipeline_options.items() if k != "feature_extractor"}
    pipe = family.pipeline_type().from_pretrained(
        path, revision=revision, variant=variant, dtype=torch_dtype, **options, **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
