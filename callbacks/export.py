"""Export the trained weights at the end of ``fit``, in the formats other tools load."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from callbacks.run_dir import run_dir
from lightning_modules.export import export_full, export_lora


class DreamBoothExport(pl.Callback):
    """Writes ``export/`` into the run directory when ``fit`` ends (rank 0 only) and prints its path.

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
        if not self.enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return
        out = self.export_dir(trainer)
        hp = pl_module.hparams
        base = (hp.pretrained_model_name_or_path, hp.revision, hp.variant)
        config = hp.get("single_file_config")
        averaged = getattr(pl_module, "averaged_weights", nullcontext)
        with averaged():  # the EMA of the trained weights when model.ema_decay is set
            if hp.use_lora:
                path = export_lora(pl_module.unet, pl_module.text_encoder, out, *base, single_file_config=config)
            else:
                te = pl_module.text_encoder if hp.train_text_encoder else None
                path = export_full(
                    pl_module.unet, te, out, *base, single_file=self.single_file, single_file_config=config
                )
        self.last_export = path
        rank_zero_info(f"Exported trained weights to {path}")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                log_export_artifact(logger, out, "lora" if hp.use_lora else "full")


def log_export_artifact(logger, folder: Path, kind: str) -> None:
    """The export folder as a W&B model artifact (stored locally too when the run is offline)."""
    import wandb

    artifact = wandb.Artifact(name=f"dreambooth-{kind}-{logger.version}", type="model")
    artifact.add_dir(str(folder))
    logger.experiment.log_artifact(artifact)
