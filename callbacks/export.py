"""Export the trained weights at the end of ``fit``, in the formats other tools load."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from callbacks.run_dir import run_dir
from lightning_modules.strategies import strategy_kind
from sd.export.folder import export_full, export_lora
from sd.models.loading import load_components


class DreamBoothExport(pl.Callback):
    """Writes ``export/`` into the run directory when ``fit`` ends (rank 0 only) and prints its path.

    Under FSDP the trained weights are first gathered from all ranks, then rank 0 writes them into a fresh copy of the
    base model's parts (the module's own parameters are shards there).

    LoRA runs get ``pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``) and
    ``pytorch_lora_weights_kohya.safetensors`` (AUTOMATIC1111, ComfyUI); full fine-tunes get ``pipeline/``
    (diffusers ``StableDiffusionPipeline.from_pretrained``) and ``model.safetensors`` (original SD layout).

    Args:
        dirpath: Where to write the export; defaults to ``<run directory>/export``.
        enabled: Set to false to skip the export.
        single_file: Full fine-tunes: also write ``model.safetensors``, one file in the original Stable Diffusion
            layout (``from_single_file``, AUTOMATIC1111, ComfyUI), beside the diffusers folder.
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True, single_file: bool = True) -> None:
        self.dirpath = dirpath
        self.enabled = enabled
        self.single_file = single_file
        self.last_export: Path | None = None

    def export_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "export"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        averaged = getattr(pl_module, "averaged_weights", nullcontext)
        with averaged():  # the EMA of the trained weights when model.ema_decay is set
            gathered = gathered_trained_weights(trainer.strategy, pl_module)  # FSDP: every rank takes part
            if not trainer.is_global_zero:
                return
            out = self.export_dir(trainer)
            hp = pl_module.hparams
            base = (hp.pretrained_model_name_or_path, hp.revision, hp.variant)
            config = hp.get("single_file_config")
            unet, text_encoder = pl_module.unet, pl_module.text_encoder
            text_encoder_2 = getattr(pl_module, "text_encoder_2", None)  # SDXL's second text encoder
            if gathered is not None:  # the modules hold shards: copies of the base model with the trained weights
                unet, text_encoder, text_encoder_2 = parts_with_weights(pl_module, gathered)
            if hp.use_lora:
                emb = pl_module.new_token_state() if hasattr(pl_module, "new_token_state") else None
                tokens = hp.get("new_tokens") if emb is not None else None
                kw = {"single_file_config": config, "text_encoder_2": text_encoder_2}
                path = export_lora(unet, text_encoder, out, *base, **kw, embeddings=emb, new_tokens=tokens)
            else:
                te, te2 = (text_encoder, text_encoder_2) if hp.train_text_encoder else (None, None)
                kw = {"single_file_config": config, "text_encoder_2": te2, "vae": hp.get("vae")}
                path = export_full(unet, te, out, *base, single_file=self.single_file, **kw)
        self.last_export = path
        rank_zero_info(f"Exported trained weights to {path}")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                log_export_artifact(logger, out, "lora" if hp.use_lora else "full")


def gathered_trained_weights(strategy: Any, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the trained weights gathered from all ranks (a collective: every rank calls it; rank 0 gets them,
    on the CPU, the others an empty dict), with the names of a full state dict; None under other strategies, whose
    modules hold whole weights (DDP, one device, DeepSpeed ZeRO-2, which shards optimizer state and gradients only)."""
    if strategy_kind(strategy) != "fsdp":
        return None
    state = strategy.lightning_module_state_dict()  # full state dict context: rank 0 only, offloaded to the CPU
    keep = pl_module.trained_state_keys()
    return {name: tensor for name, tensor in state.items() if name in keep}


def parts_with_weights(pl_module: pl.LightningModule, weights: dict[str, torch.Tensor]) -> tuple[nn.Module, ...]:
    """(UNet, text encoder or None, SDXL's second text encoder or None): the base model's, loaded afresh on the CPU,
    with the trained ``weights`` (``unet.*`` / ``text_encoder.*`` / ``text_encoder_2.*`` names, every trained weight
    present) in place."""
    hp = pl_module.hparams
    parts = load_components(
        hp.pretrained_model_name_or_path,
        hp.revision,
        hp.variant,
        hp.get("single_file_config"),
        with_vae=False,
        with_text_encoder=bool(hp.train_text_encoder),
    )
    missing = sorted(pl_module.trained_state_keys() - set(weights))
    if missing:
        raise RuntimeError(f"The gathered weights lack {len(missing)} trained weights, e.g. {missing[:3]}.")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module, prefix = getattr(parts, name, None), f"{name}."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if own:
            unknown = module.load_state_dict(own, strict=False).unexpected_keys
            if unknown:
                raise RuntimeError(f"The gathered {name} weights do not fit the base model: {unknown[:3]}")
    return parts.unet, parts.text_encoder, getattr(parts, "text_encoder_2", None)


def log_export_artifact(logger, folder: Path, kind: str) -> None:
    """The export folder as a W&B model artifact (stored locally too when the run is offline)."""
    import wandb

    artifact = wandb.Artifact(name=f"dreambooth-{kind}-{logger.version}", type="model")
    artifact.add_dir(str(folder))
    logger.experiment.log_artifact(artifact)
