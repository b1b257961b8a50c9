"""Exports that other tools load, written atomically, Lightning-free.

- LoRA: ``pytorch_lora_weights.safetensors`` in the layout diffusers' ``load_lora_weights`` reads.
- Full fine-tune: ``pipeline/``, a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from lightning_modules.lora import lora_metadata, lora_state_dict
from lightning_modules.sd_loading import check_model_path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PIPELINE_DIRNAME = "pipeline"
INFO_NAME = "export_info.json"


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    A crash or an exception leaves ``target`` as it was: an earlier good export is never replaced by a partial one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def check_finite(models: dict[str, nn.Module | None]) -> None:
    """Refuse to export weights that hold NaN or infinity (a diverged run)."""
    for model_name, model in models.items():
        for name, param in model.named_parameters() if model is not None else []:
            if param.requires_grad and not torch.isfinite(param).all():
                raise FloatingPointError(f"Not exporting: {model_name}.{name} holds NaN or infinite values.")


def export_lora(unet: nn.Module, text_encoder: nn.Module | None, out_dir: str | Path, base_model: str) -> Path:
    """Write the UNet (and text-encoder, when it has one) LoRA adapters as one diffusers LoRA file.

    ``text_encoder`` may be None (a frozen text encoder that was never loaded: cached text embeddings).
    """
    check_finite({"unet": unet, "text_encoder": text_encoder})
    te = text_encoder is not None and has_lora(text_encoder)
    with atomic_directory(out_dir) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict(unet),
            text_encoder_lora_layers=lora_state_dict(text_encoder) if te else None,
            unet_lora_adapter_metadata=lora_metadata(unet),
            text_encoder_lora_adapter_metadata=lora_metadata(text_encoder) if te else None,
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        _write_info(tmp, base_model, kind="lora", files=[LORA_WEIGHT_NAME])
    return Path(out_dir) / LORA_WEIGHT_NAME


def export_full(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    out_dir: str | Path,
    base_model: str,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """Write a diffusers pipeline folder: the trained UNet (and text encoder), the base model's other parts."""
    trained = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    check_finite(trained)
    pipe = StableDiffusionPipeline.from_pretrained(
        check_model_path(base_model),
        revision=revision,
        variant=variant,
        safety_checker=None,
        requires_safety_checker=False,
        **trained,
    )
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp / PIPELINE_DIRNAME, safe_serialization=True)
        _write_info(tmp, base_model, kind="full", files=[PIPELINE_DIRNAME])
    return Path(out_dir) / PIPELINE_DIRNAME


def _write_info(folder: Path, base_model: str, kind: str, files: list[str]) -> None:
    info = {"kind": kind, "base_model": base_model, "files": files}
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
