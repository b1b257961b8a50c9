"""LoRA through peft, Lightning-free: inject, list trainable weights, and get what diffusers saves."""

from __future__ import annotations

from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> LoraConfig:
    """The peft config; alpha defaults to the rank (scale 1), as in the diffusers DreamBooth LoRA script."""
    if rank <= 0:
        raise ValueError(f"model.lora_rank must be a positive integer, got {rank}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.lora_dropout must be in [0, 1), got {dropout}.")
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def inject_lora(model: nn.Module, config: LoraConfig) -> None:
    """Add a trainable LoRA adapter to a frozen diffusers UNet or transformers text encoder, in place.

    The base weights stay frozen; the adapter's weights are made float32 so they train in full precision even when the
    base model is held in half precision.
    """
    model.requires_grad_(False)
    model.add_adapter(config)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"LoRA target modules {sorted(config.target_modules)} matched no layer of {type(model).__name__}."
        )


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in the key layout diffusers' ``save_lora_weights`` / ``load_lora_weights`` use."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))


def lora_metadata(model: nn.Module) -> dict:
    """The adapter's config (rank, alpha, targets), stored in the safetensors header so alpha survives a reload."""
    config = model.peft_config["default"]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "lora_dropout": config.lora_dropout,
    }
