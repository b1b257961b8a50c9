"""ControlNet for rendering, Lightning-free: load one, build a pipeline around the live modules, a tiny offline one.

A ControlNet adds residuals computed from a condition image (a pose skeleton, edges, depth) to the UNet's features,
so renders follow the condition while the (fine-tuned or LoRA) UNet draws the subject. A ControlNet is made for one
family: SD 1.x ones (e.g. ``lllyasviel/sd-controlnet-openpose``) for SD 1.x, SD 2.x ones for SD 2.x, SDXL ones (e.g.
``thibaud/controlnet-openpose-sdxl-1.0``, whose config has SDXL's ``text_time`` added conditioning) for SDXL; the
family's ControlNet pipeline renders with it (``Family.controlnet_pipeline_class``).

``builtin:tiny-controlnet`` is a ControlNet for ``builtin:tiny-sd``, ``builtin:tiny-sd2-controlnet`` one for
``builtin:tiny-sd2`` and ``builtin:tiny-sdxl-controlnet`` one for ``builtin:tiny-sdxl``, built offline from the
model's UNet (diffusers' ``ControlNetModel.from_unet``) into the built-in cache, with fixed-seed random weights. A new
ControlNet starts with zero convolutions, so that the condition changes nothing before it is trained; here they get
small random weights instead (and the condition embedding variance-keeping ones), so that the condition visibly
changes the render, which is what tests need to see.
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
from sd.models.families import Family

TINY_CONTROLNET = "builtin:tiny-controlnet"
TINY_SDXL_CONTROLNET = "builtin:tiny-sdxl-controlnet"
TINY_CONTROLNETS = {  # name -> the built-in model it is made for
    TINY_CONTROLNET: "builtin:tiny-sd",
    "builtin:tiny-sd2-controlnet": "builtin:tiny-sd2",
    TINY_SDXL_CONTROLNET: "builtin:tiny-sdxl",
}
_TINY_VERSION = 1
_SEED = 0


def build_tiny_controlnet(out_dir: str | Path, base: str = "builtin:tiny-sd") -> None:
    """Write a ControlNet for a tiny model (its UNet's encoder, random fixed-seed zero convs) into ``out_dir``."""
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


def _tiny_controlnet_path(name: str) -> Path:
    """The cached build of a built-in ControlNet, built on first use (atomically: build beside, then rename)."""
    target = cache_dir() / "builtin" / f"{name.removeprefix(BUILTIN_PREFIX)}-v{_TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_controlnet(tmp, TINY_CONTROLNETS[name])
        give_ordinary_modes(tmp)  # mkdtemp makes it private; the built folder is an ordinary one
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_controlnet(name_or_path: str, option: str = "model.controlnet") -> str:
    """Where a ControlNet's files are: a built-in one's cached build, a local folder (checked), or the hub id."""
    if name_or_path in TINY_CONTROLNETS:
        path = str(_tiny_controlnet_path(name_or_path))
    elif name_or_path.startswith(BUILTIN_PREFIX):
        raise ConfigError(
            f"{option}: unknown built-in ControlNet {name_or_path!r}; available: {', '.join(TINY_CONTROLNETS)}"
        )
    else:
        path = name_or_path
        looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
        if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
            what = (
                "does not exist" if not os.path.exists(path) else "is no diffusers ControlNet folder (no config.json)"
            )
            raise InputNotFoundError(
                f"{option}: {path!r} {what}. Give a hub id (e.g. lllyasviel/sd-controlnet-openpose), a folder "
                f"written by ControlNetModel.save_pretrained, or one of {', '.join(TINY_CONTROLNETS)}."
            )
    return path


def load_controlnet(name_or_path: str, option: str = "model.controlnet") -> ControlNetModel:
    """A ControlNet from a hub id, a local diffusers folder, or a built-in one; frozen, in eval mode."""
    controlnet = ControlNetModel.from_pretrained(resolve_controlnet(name_or_path, option))
    return controlnet.requires_grad_(False).eval()


def controlnet_is_sdxl(config: dict) -> bool:
    """Whether a ControlNet (its config) is made for SDXL: it takes SDXL's added time / text conditioning."""
    return config.get("addition_embed_type") == "text_time"


def check_controlnet_family(name_or_path: str, family: Family | None, option: str = "model.controlnet") -> None:
    """Fail early, from the ControlNet's config alone (no weights load), when it is made for SDXL and the base model is
    SD 1.x / 2.x, or the reverse. (SD 1.x against SD 2.x is told by the widths, :func:`check_controlnet_fits`.)
    ``family``: the base model's (None: not known here, e.g. a hub id offline; loading will say more)."""
    if family is None:
        return
    try:
        config = ControlNetModel.load_config(resolve_controlnet(name_or_path, option))
    except OSError:  # not at hand (a hub id offline and not cached): loading it will say so
        return
    made_for_sdxl = controlnet_is_sdxl(config)
    if made_for_sdxl != (family.added_conditioning == "text_time"):
        made_for = "SDXL" if made_for_sdxl else "Stable Diffusion 1.x / 2.x"
        raise ConfigError(
            f"{option}: {name_or_path!r} is a ControlNet for {made_for}, but the base model "
            f"(model.pretrained_model_name_or_path) is {family.label}; use a ControlNet made for {family.label}"
            + (" (e.g. thibaud/controlnet-openpose-sdxl-1.0)." if family.name == "sdxl" else ".")
        )


def check_controlnet_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str) -> None:
    """Fail with a clear message when the ControlNet was made for another architecture (e.g. SDXL, or SD 2.x)."""
    for key in ("cross_attention_dim", "block_out_channels"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if mine is not None and str(list(_as_list(mine))) != str(list(_as_list(theirs))):
            raise ConfigError(
                f"model.controlnet: {name!r} does not fit the base model's UNet ({key} {mine} vs {theirs}); use a "
                "ControlNet made for this base model's family (SD 1.x ControlNets for SD 1.x, SD 2.x ones for SD 2.x, "
                "SDXL ones for SDXL)."
            )


def check_controlnet_for_model(name_or_path: str, pretrained_model_name_or_path: str, revision: str | None) -> None:
    """:func:`check_controlnet_family` for the base model ``model.pretrained_model_name_or_path``, told from its small
    config files (or a single file's key names): before the base model or the ControlNet's weights load."""
    from sd.models.loading import check_model_path, detect_family

    check_controlnet_family(
        name_or_path, detect_family(check_model_path(pretrained_model_name_or_path, revision), revision)
    )


def _as_list(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]
