"""Stable Diffusion 1.x / 2.x models built offline from configs, addressed as ``builtin:<name>``.

No machine here reaches a model hub, so tests, the demo and memory benchmarks use models built locally:

- ``builtin:tiny-sd``: a tiny SD 1.x (UNet, VAE with a downscale factor of 4, 2-layer CLIP text encoder,
  the real CLIP tokenizer, the SD 1.x PNDM scheduler) with fixed-seed random weights; native size 64 px.
- ``builtin:tiny-sd-v``: the same with a ``v_prediction`` scheduler.
- ``builtin:tiny-sd2``: a tiny SD 2.x (the 2.1-768-v shape: OpenCLIP-style text encoder with ``gelu``, SD 2.x's
  padding token ``!``, linear projections in the UNet's transformers, head widths per level, ``v_prediction``).
- ``builtin:tiny-sdxl``: a tiny SDXL base (two text encoders, CLIP-style then OpenCLIP-style with a projection, whose
  penultimate hidden states are concatenated (32 + 48 wide); a UNet with SDXL's added ``text_time`` conditioning, its
  dimensions consistent: 6 time ids x 8 + the 40-wide pooled embedding; SDXL's Euler scheduler config and VAE scaling
  factor, ``force_upcast``); native size 64 px.
- ``builtin:sdxl-random``: the real SDXL base architecture with random weights (about 14 GB in float32), for memory
  benchmarks only. Built only when asked for.
- ``builtin:small-sd``: a small SD 1.x (UNet channels 64-128-256 with cross-attention, VAE factor 4), native
  size 128 px, for speed benchmarks: large enough that the UNet dominates a training step.
- ``builtin:sd15-random``: the real SD 1.5 architecture with random weights (about 4 GB in float32), for
  memory and speed benchmarks. Built only when asked for.
- ``builtin:toy-sd``: a small SD 1.x pretrained on the toy world (:mod:`datamodules.toy_world`, 32 px), its
  weights in the repository (``models/toy-world-v1``, made by ``scripts/pretrain_toy.py``).

:func:`resolve_pretrained` turns a built-in name into a local diffusers folder (built once into a cache and
reused), so every loader takes the one ``from_pretrained`` code path. Other strings pass through unchanged.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from sd.models.configs import CLIP_TEXT_COMMON, SD1_SCHEDULER

BUILTIN_PREFIX = "builtin:"
CACHE_ENV = "DREAMBOOTH_CACHE"
DEFAULT_CACHE = Path("~/.cache/dreambooth_lightning")
SEED = 0


def _tiny_sd_configs(prediction_type: str = "epsilon") -> dict[str, dict[str, Any]]:
    return {
        "unet": {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": (16, 32, 32),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        "text_encoder": {
            **CLIP_TEXT_COMMON,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        "scheduler": {**SD1_SCHEDULER, "prediction_type": prediction_type},
    }


def _tiny_sd2_configs() -> dict[str, dict[str, Any]]:
    """A tiny SD 2.x: what differs from SD 1.x in the real models (stabilityai/stable-diffusion-2-1), at tiny size."""
    cfg = _tiny_sd_configs("v_prediction")
    cfg["unet"].update({"attention_head_dim": (2, 4), "use_linear_projection": True})  # 16 channels per head
    cfg["text_encoder"].update({"hidden_act": "gelu"})  # OpenCLIP's MLP activation (OpenAI CLIP: quick_gelu)
    cfg["tokenizer"] = {"pad_token": "!"}
    return cfg


# SDXL's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json: EulerDiscreteScheduler).
SDXL_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}
SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}  # SDXL's VAE: another scale; overflows in float16
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def _tiny_sdxl_configs() -> dict[str, dict[str, Any]]:
    """A tiny SDXL base: what differs from SD 1.x in stabilityai/stable-diffusion-xl-base-1.0, at tiny size."""
    cfg = _tiny_sd_configs()
    te1, te2, pooled, time_dim = 32, 48, 40, 8
    cfg["unet"].update(
        {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),  # no attention at the first level, as SDXL
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "cross_attention_dim": te1 + te2,  # both encoders' hidden states, concatenated
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": TIME_IDS * time_dim + pooled,
        }
    )
    cfg["vae"].update(SDXL_VAE)
    cfg["text_encoder"].update({"hidden_size": te1})  # CLIP ViT-L's shape (quick_gelu)
    cfg["text_encoder_2"] = {
        **CLIP_TEXT_COMMON,
        "hidden_size": te2,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": pooled,
        "hidden_act": "gelu",  # OpenCLIP bigG
    }
    cfg["tokenizer_2"] = {"pad_token": "!"}  # OpenCLIP's tokenizer pads with "!" (as SD 2.x's)
    cfg["scheduler"] = dict(SDXL_SCHEDULER)
    return cfg


def _sdxl_configs() -> dict[str, dict[str, Any]]:
    """The SDXL base 1.0 architecture (its published configs), for memory benchmarks."""
    return {
        "unet": {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "cross_attention_dim": 2048,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        },
        "vae": {**_sd15_configs()["vae"], "sample_size": 1024, **SDXL_VAE},
        "text_encoder": {**_sd15_configs()["text_encoder"]},
        "text_encoder_2": {
            **CLIP_TEXT_COMMON,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
        "tokenizer_2": {"pad_token": "!"},
        "scheduler": dict(SDXL_SCHEDULER),
    }


def _small_sd_configs() -> dict[str, dict[str, Any]]:
    """A small SD 1.x for speed benchmarks: big enough that the UNet, not the Python around it, takes the time."""
    return {
        "unet": {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (64, 128, 256),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 128,
        },
        "text_encoder": {
            **CLIP_TEXT_COMMON,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
        },
        "scheduler": dict(SD1_SCHEDULER),
    }


def _sd15_configs() -> dict[str, dict[str, Any]]:
    return {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
        },
        "text_encoder": {
            **CLIP_TEXT_COMMON,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "scheduler": dict(SD1_SCHEDULER),
    }


def _toy_configs() -> dict[str, dict[str, Any]]:
    from sd.models.toy import toy_sd_configs, toy_vae_scaling_factor

    cfg = toy_sd_configs()
    cfg["vae"]["scaling_factor"] = toy_vae_scaling_factor()
    return cfg


@dataclass(frozen=True)
class BuiltinModel:
    """A registered built-in model. Bump ``version`` whenever what the builder writes changes."""

    name: str
    version: int
    description: str
    configs: Callable[[], dict[str, dict[str, Any]]]
    pretrained: bool = False  # weights from the repository's models/ folder (the toy world), else fixed-seed random


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("tiny-sd", 1, "tiny SD 1.x, epsilon prediction, 64 px", _tiny_sd_configs),
        BuiltinModel("tiny-sd-v", 1, "tiny SD 1.x, v_prediction, 64 px", lambda: _tiny_sd_configs("v_prediction")),
        BuiltinModel("tiny-sd2", 1, "tiny SD 2.x, v_prediction, 64 px", _tiny_sd2_configs),
        BuiltinModel("tiny-sdxl", 1, "tiny SDXL base, two text encoders, 64 px", _tiny_sdxl_configs),
        BuiltinModel("sdxl-random", 1, "SDXL base architecture, random weights (~14 GB fp32)", _sdxl_configs),
        BuiltinModel("small-sd", 1, "small SD 1.x for speed benchmarks, 128 px", _small_sd_configs),
        BuiltinModel("sd15-random", 1, "SD 1.5 architecture, random weights (~4 GB fp32)", _sd15_configs),
        BuiltinModel(
            "toy-sd", 1, "toy SD pretrained on the toy world (models/toy-world-v1), 32 px", _toy_configs, True
        ),
    )
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def _lookup(name: str) -> BuiltinModel:
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ConfigError(f"unknown built-in model {BUILTIN_PREFIX + name!r}; known built-in models: {known}")
    return BUILTIN_MODELS[name]


def model_configs(name: str) -> dict[str, dict[str, Any]]:
    """The component configs (``unet``, ``vae``, ``text_encoder``, ``scheduler``, optionally ``tokenizer``; SDXL's also
    ``text_encoder_2`` and ``tokenizer_2``) of a built-in model."""
    return copy.deepcopy(_lookup(name).configs())


def cache_dir() -> Path:
    """Where built models live: ``$DREAMBOOTH_CACHE`` if set, else ``~/.cache/dreambooth_lightning``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def builtin_path(name: str) -> Path:
    """The cache folder of a built-in model (which may not exist yet)."""
    model = _lookup(name)
    suffix = ""
    if model.pretrained:  # the build copies the repository's weights: a new set of weights is a new folder
        from sd.models.toy import weights_fingerprint

        suffix = f"-{weights_fingerprint()}"
    return cache_dir() / "builtin" / f"{model.name}-v{model.version}{suffix}"


def build_builtin(name: str, out_dir: str | Path) -> None:
    """Build a built-in model into ``out_dir`` (absent or empty) as a diffusers pipeline folder.

    The weights depend only on the name: each model is initialised with the CPU generator freshly seeded, which is
    restored afterwards, so the caller's random state is left alone.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from core.rng_state import cpu_seeded
    from sd.models.clip_tokenizer import write_clip_tokenizer

    cfg = model_configs(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"build_builtin: {out_dir} is not empty")
    sdxl = "text_encoder_2" in cfg  # the components the configs describe say which pipeline they make
    tokenizers = {}
    for part in ("tokenizer", "tokenizer_2")[: 1 + sdxl]:
        write_clip_tokenizer(out_dir / part, **cfg.get(part, {}))
        tokenizers[part] = CLIPTokenizer.from_pretrained(out_dir / part)

    def make(part: str) -> torch.nn.Module:
        if part == "unet":
            return UNet2DConditionModel(**cfg["unet"])
        if part == "vae":
            return AutoencoderKL(**cfg["vae"])
        if part == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).eval()

    # Each part is made (its own seed), written and dropped before the next, as the pipeline's save_pretrained would
    # write it: the build holds one part at a time (sdxl-random: the 10.3 GB UNet, not all 14 GB).
    for offset, part in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")[: 3 + sdxl]):
        with cpu_seeded(SEED + offset):
            module = make(part)
        if _lookup(name).pretrained:
            from sd.models.toy import load_weights

            load_weights(module, part)
        module.save_pretrained(out_dir / part)  # safetensors, as the pipeline writes them
        del module
    with torch.device("meta"):  # stand-ins that name each part's class in model_index.json, holding no weights
        parts = {part: make(part) for part in ("unet", "vae", "text_encoder", "text_encoder_2")[: 3 + sdxl]}
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(
            scheduler=diffusers.EulerDiscreteScheduler.from_config(cfg["scheduler"]),
            add_watermarker=False,
            **parts,
            **tokenizers,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            scheduler=diffusers.PNDMScheduler(**cfg["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **parts,
            **tokenizers,
        )
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    for part, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(out_dir / part)
    pipe.save_config(out_dir)  # model_index.json, last: it marks the folder complete
    # transformers may save the tokenizer in its own layout; keep the SD 1.x one (vocab.json + merges.txt),
    # which every transformers version reads.
    for part in tokenizers:
        write_clip_tokenizer(out_dir / part, **cfg.get(part, {}))


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _discard(folder: Path) -> None:
    """Remove a folder without leaving a half-deleted one at its name (rename aside first)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.trash-", dir=folder.parent))
    try:
        os.rename(folder, aside / folder.name)
    except FileNotFoundError:
        pass  # someone else removed it
    shutil.rmtree(aside, ignore_errors=True)


def _materialize(name: str, target: Path) -> Path:
    """Make ``target`` a complete build of ``name``: build beside it, then rename into place atomically.

    Safe when several processes race: the first rename wins, the others discard their build.
    """
    from core.safe_files import give_ordinary_modes  # imports torch, which this module's import avoids

    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_builtin(name, tmp)
        give_ordinary_modes(tmp)  # mkdtemp makes it private; the built folder is an ordinary one
        if _is_complete(target):  # another process finished first
            return target
        if target.exists():  # a leftover that is no complete model (e.g. copied by hand, interrupted)
            _discard(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_pretrained(name_or_path: str) -> str:
    """Map ``builtin:<name>`` to its local diffusers folder, building it on first use; return others unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    return str(_materialize(name_or_path, builtin_path(name_or_path)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sd.models.builtin",
        description="Build a built-in model (if needed) and print its diffusers folder.",
    )
    parser.add_argument("name", help=f"one of: {', '.join(BUILTIN_MODELS)} (the 'builtin:' prefix is optional)")
    parser.add_argument("--out", type=Path, help=f"build into this folder instead of the cache (${CACHE_ENV})")
    args = parser.parse_args(argv)
    try:
        _lookup(args.name)
    except ValueError as e:
        parser.error(str(e))
    if args.out is not None:
        out = args.out.expanduser().absolute()
        if out.exists() and not _is_complete(out) and (not out.is_dir() or any(out.iterdir())):
            parser.error(f"--out {out} exists and is no built model; give a new or empty folder")
        path = _materialize(args.name, out)
    else:
        path = Path(resolve_pretrained(BUILTIN_PREFIX + args.name.removeprefix(BUILTIN_PREFIX)))
    print(path)


if __name__ == "__main__":
    main()
