"""The original (CompVis latent-diffusion) model config of a pipeline, as AUTOMATIC1111 reads it, Lightning-free.

AUTOMATIC1111 takes the config of a single-file checkpoint from ``<checkpoint name>.yaml`` beside the file, and only
otherwise guesses it from the weights; for Stable Diffusion 1.x it always guesses epsilon prediction (for 2.x it
tries a step of the model). A v-prediction
model exported as one file therefore needs this config beside it, with ``parameterization: "v"``, or it renders noise
and nobody is told. The config is written from the pipeline's own diffusers configs, so it describes the exported
architecture (the tiny test models included), not a stock SD 1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

V_PREDICTION = "v_prediction"
SD1_COND_STAGE = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}


def is_v_prediction(scheduler_config: Any) -> bool:
    """Whether a scheduler config (diffusers) says the model predicts the velocity v."""
    return scheduler_config.get("prediction_type", "epsilon") == V_PREDICTION


def _unet_params(unet: dict, latent_size: int) -> dict[str, Any]:
    """``UNetModel`` parameters (``ldm.modules.diffusionmodules.openaimodel``) of a diffusers UNet config."""
    channels = list(unet["block_out_channels"])
    heads = unet.get("attention_head_dim") or 8
    params: dict[str, Any] = {
        "image_size": latent_size,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": channels[0],
        # The LDM UNet lists the downsampling factors (1, 2, 4, ...) of the levels that have attention.
        "attention_resolutions": [2**i for i, t in enumerate(unet["down_block_types"]) if "Attn" in t],
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": [c // channels[0] for c in channels],
        "use_spatial_transformer": True,
        "transformer_depth": unet.get("transformer_layers_per_block") or 1,
        "context_dim": unet["cross_attention_dim"],
        "use_linear_in_transformer": bool(unet.get("use_linear_projection")),
        "use_checkpoint": False,
        "legacy": False,
    }
    if isinstance(heads, int):  # SD 1.x: diffusers' attention_head_dim is the number of heads
        params["num_heads"] = heads
    else:  # SD 2.x: one head width (64) for all levels
        params["num_head_channels"] = channels[0] // heads[0]
    return params


def _vae_params(vae: dict) -> dict[str, Any]:
    """``AutoencoderKL`` parameters (``ldm.models.autoencoder``) of a diffusers VAE config."""
    channels = list(vae["block_out_channels"])
    return {
        "embed_dim": vae["latent_channels"],
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": vae["latent_channels"],
            "resolution": vae.get("sample_size") or 256,
            "in_channels": vae["in_channels"],
            "out_ch": vae["out_channels"],
            "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels],
            "num_res_blocks": vae["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def ldm_config(unet: dict, vae: dict, scheduler: dict, cond_stage_config: dict | None = None) -> dict[str, Any]:
    """The ``LatentDiffusion`` config of a Stable Diffusion pipeline, from its diffusers configs.

    ``cond_stage_config`` is the family's text encoder (:attr:`sd.models.families.Family.cond_stage_config`);
    SD 1.x's ``FrozenCLIPEmbedder`` by default.
    """
    latent_size = unet.get("sample_size") or 64
    params = {
        "linear_start": scheduler.get("beta_start", 0.00085),
        "linear_end": scheduler.get("beta_end", 0.012),
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": scheduler.get("num_train_timesteps", 1000),
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": latent_size,
        "channels": unet["in_channels"],
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": vae.get("scaling_factor", 0.18215),
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": _unet_params(unet, latent_size),
        },
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _vae_params(vae)},
        "cond_stage_config": dict(cond_stage_config or SD1_COND_STAGE),
    }
    if is_v_prediction(scheduler):
        params = {"parameterization": "v", **params}
    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def write_ldm_config(pipe: Any, path: str | Path, cond_stage_config: dict | None = None) -> Path:
    """Write the pipeline's LDM config as YAML (``<checkpoint name>.yaml``, which AUTOMATIC1111 looks for).

    ``cond_stage_config``: the family's text encoder (``Family.cond_stage_config``); SD 1.x's by default.
    """
    config = ldm_config(dict(pipe.unet.config), dict(pipe.vae.config), dict(pipe.scheduler.config), cond_stage_config)
    Path(path).write_text(
        "# The original (latent-diffusion) config of the checkpoint beside it, for AUTOMATIC1111, which reads\n"
        "# <checkpoint name>.yaml. Written by dreambooth-lightning from the model's diffusers configs.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return Path(path)
