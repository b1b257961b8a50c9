"""The toy world's models: their sizes (one place), builders, and loading of the pretrained weights.

``scripts/pretrain_toy.py`` builds them with these functions and trains them on :mod:`datamodules.toy_world`; the
trained weights live in the repository (``models/toy-world-v1/``, float16 safetensors with their recipe and log)
and are reached as ``builtin:toy-sd`` (a diffusers folder, see :mod:`sd.models.builtin`),
``builtin:toy-dino`` and ``builtin:toy-clip`` (:mod:`metrics.encoders`, which builds those two and loads their weights
with :func:`load_weights`; nothing here imports the metrics).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from core.rng_state import cpu_seeded
from sd.models.configs import CLIP_TEXT_COMMON, SD1_SCHEDULER

TOY_RESOLUTION = 32
TOY_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "toy-world-v1"

# What differs between the toy worlds' models (the rest is toy_sd_configs). A weights folder says its world in
# recipe.json ("world"; absent: 1).
#   1: cross-attention at the UNet's 4 x 4 level only (on a 2-core CPU, attention at 8 x 8 costs ~25 % per step),
#      and a VAE trained on the captioned world alone.
#   2: cross-attention at both levels, as SD has it where texture is drawn (its attention layers are what LoRA
#      adapts), and a wider VAE, trained on patterns and colours beyond the captioned world (scripts/pretrain_toy.py).
WORLDS: dict[int, dict[str, Any]] = {
    1: {"unet_attention": (False, True), "vae_channels": (32, 64, 64)},
    2: {"unet_attention": (True, True), "vae_channels": (48, 96, 96)},
}


def world_of(folder: Path | None = None) -> int:
    """The world a weights folder was pretrained for (its recipe.json's ``world``; 1 when absent)."""
    recipe = (folder or weights_folder()) / "recipe.json"
    return int(json.loads(recipe.read_text()).get("world", 1)) if recipe.is_file() else 1


def toy_sd_configs(world: int | None = None) -> dict[str, dict[str, Any]]:
    """Component configs of the toy SD of ``world`` (default: that of the weights in use): 32 px images, 8 x 8 x 4
    latents."""
    arch = WORLDS[world or world_of()]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch["unet_attention"])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch["unet_attention"]))
    return {
        "unet": {
            "sample_size": TOY_RESOLUTION // 4,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (64, 128),
            "layers_per_block": 1,
            "down_block_types": down,
            "up_block_types": up,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": arch["vae_channels"],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 16,
            "sample_size": TOY_RESOLUTION,
        },
        "text_encoder": {
            **CLIP_TEXT_COMMON,
            "hidden_size": 32,  # the 49408-token embedding is most of its size
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        "scheduler": dict(SD1_SCHEDULER),
    }


def _seeded(build, seed: int):
    with cpu_seeded(seed):
        return build()


def build_toy_sd(seed: int = 0, world: int | None = None) -> dict[str, nn.Module]:
    """Freshly initialised ``vae``, ``unet``, ``text_encoder`` and the training scheduler ``sched`` of ``world``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = toy_sd_configs(world)
    return {
        "vae": _seeded(lambda: AutoencoderKL(**cfg["vae"]), seed),
        "unet": _seeded(lambda: UNet2DConditionModel(**cfg["unet"]), seed + 1),
        "text_encoder": _seeded(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), seed + 2),
        "sched": DDPMScheduler.from_config(cfg["scheduler"]),
    }


def toy_tokenizer():
    """The real CLIP tokenizer (written from open_clip's BPE vocabulary, as for every built-in model)."""
    import tempfile

    from transformers import CLIPTokenizer

    from sd.models.clip_tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def weights_folder() -> Path:
    """The toy world's weights: ``models/toy-world-v1``, or ``$DREAMBOOTH_TOY_WEIGHTS`` (another pretraining's output)."""
    import os

    return Path(os.environ.get("DREAMBOOTH_TOY_WEIGHTS") or TOY_WEIGHTS)


def load_weights(module: nn.Module, name: str, folder: Path | None = None) -> nn.Module:
    """Load ``<folder>/<name>.safetensors`` (float16 on disk) into ``module`` in float32; strict."""
    from safetensors.torch import load_file

    folder = folder or weights_folder()
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"The toy world's weights {path} are missing: models/toy-world-v1 comes with the repository (git "
            "checkout); another folder (DREAMBOOTH_TOY_WEIGHTS) is made by `python -m scripts.pretrain_toy --out <folder>`."
        )
    state = {k: v.float() for k, v in load_file(path).items()}
    module.load_state_dict(state, strict=True)
    return module


_FINGERPRINTED = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "recipe.json")


def weights_fingerprint(folder: Path | None = None) -> str:
    """A short hash of the SD weight files and the recipe, so a cached build is never stale.

    Hashed once per state of the files (their size and modification time): every load resolves the name again.
    """
    folder = folder or weights_folder()
    stats = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in _files(folder))
    return _hash_files(folder, stats)


def _files(folder: Path) -> list[Path]:
    return [folder / name for name in _FINGERPRINTED]


@functools.lru_cache(maxsize=8)
def _hash_files(folder: Path, stats: tuple) -> str:
    digest = hashlib.sha256()
    for path, stat in zip(_files(folder), stats, strict=True):
        digest.update(path.read_bytes() if stat is not None else b"missing")
    return digest.hexdigest()[:10]


def toy_vae_scaling_factor(folder: Path | None = None) -> float:
    folder = folder or weights_folder()
    return float(json.loads((folder / "recipe.json").read_text())["vae_scaling_factor"])
