"""ControlNet for rendering, Lightning-free: load one, build a pipeline around the live modules, a tiny offline one.

A ControlNet adds residuals computed from a condition image (a pose skeleton, edges, depth) to the UNet's features,
so renders follow the condition while the (fine-tuned or LoRA) UNet draws the subject. Any SD 1.x ControlNet works,
e.g. ``lllyasviel/sd-controlnet-openpose`` with an OpenPose skeleton image.

``builtin:tiny-controlnet`` is a ControlNet for ``builtin:tiny-sd``, built offline from its UNet (diffusers'
``ControlNetModel.from_unet``) into the built-in cache, with fixed-seed random weights. A new ControlNet starts with
zero convolutions, so that the condition changes nothing before it is trained; here they get small random weights
instead (and the condition embedding variance-keeping ones), so that the condition visibly changes the render, which
is what tests need to see.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

from core.errors import ConfigError, InputNotFoundError
from core.rng_state import cpu_seeded
from core.safe_files import give_ordinary_modes
from sd.models.builtin import BUILTIN_PREFIX, cache_dir, resolve_pretrained

TINY_CONTROLNET = "builtin:tiny-controlnet"
_TINY_VERSION = 1
_SEED = 0


def build_tiny_controlnet(out_dir: str | Path, base: str = "builtin:tiny-sd") -> None:
    """Write a ControlNet for the tiny SD (its UNet's encoder, random fixed-seed zero convolutions) into ``out_dir``."""
    path = resolve_pretrained(base)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae_blocks = len(AutoencoderKL.load_config(path, subfolder="vae")["block_out_channels"])
    # The condition embedding halves the size once per block after the first, down to the latent size: as the VAE.
    channels = (8, 16, 32, 64, 128)[:vae_blocks]
    with cpu_seeded(_SEED):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
        # Variance-keeping weights in the condition embedding, and small random ones in place of the zero convs.
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1)
    controlnet.save_pretrained(out_dir, safe_serialization=True)


def _tiny_controlnet_path() -> Path:
    """The cached build of ``builtin:tiny-controlnet``, built on first use (atomically: build beside, then rename)."""
    target = cache_dir() / "builtin" / f"tiny-controlnet-v{_TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_controlnet(tmp)
        give_ordinary_modes(tmp)  # mkdtemp makes it private; the built folder is an ordinary one
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_controlnet(name_or_path: str, option: str = "model.controlnet") -> ControlNetModel:
    """A ControlNet from a hub id, a local diffusers folder, or ``builtin:tiny-controlnet``; frozen, in eval mode."""
    if name_or_path == TINY_CONTROLNET:
        path = str(_tiny_controlnet_path())
    elif name_or_path.startswith(BUILTIN_PREFIX):
        raise ConfigError(f"{option}: unknown built-in ControlNet {name_or_path!r}; available: {TINY_CONTROLNET}")
    else:
        path = name_or_path
        looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
        if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
            what = (
                "does not exist" if not os.path.exists(path) else "is no diffusers ControlNet folder (no config.json)"
            )
            raise InputNotFoundError(
                f"{option}: {path!r} {what}. Give a hub id (e.g. lllyasviel/sd-controlnet-openpose), a folder "
                "written by ControlNetModel.save_pretrained, or builtin:tiny-controlnet."
            )
    controlnet = ControlNetModel.from_pretrained(path)
    return controlnet.requires_grad_(False).eval()


def check_controlnet_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str) -> None:
    """Fail with a clear message when the ControlNet was made for another architecture (e.g. SDXL, or SD 2.x)."""
    for key in ("cross_attention_dim", "block_out_channels"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if mine is not None and str(list(_as_list(mine))) != str(list(_as_list(theirs))):
            raise ConfigError(
                f"model.controlnet: {name!r} does not fit the base model's UNet ({key} {mine} vs {theirs}); use a "
                "ControlNet made for this base model's family (SD 1.x ControlNets for SD 1.x, SD 2.x ones for SD 2.x)."
            )


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]
