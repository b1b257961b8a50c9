"""LoRA through peft, Lightning-free: inject, list trainable weights, get what diffusers saves, load it back."""

from __future__ import annotations

from pathlib import Path

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


def resolve_lora_file(path: str | Path, option: str = "model.lora_weights") -> Path:
    """An export folder (holding ``pytorch_lora_weights.safetensors``) or a LoRA ``.safetensors`` file -> the file.

    Cheap (no loading), so it runs at config time. Raises FileNotFoundError naming ``option`` and the path.
    """
    from lightning_modules.export import LORA_WEIGHT_NAME, PIPELINE_DIRNAME  # export imports this module

    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{option}: {str(path)!r} is not a .safetensors LoRA file.")
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"{option}: {str(path)!r} does not exist. Give the export folder that fit wrote (<run dir>/export) or its "
            f"{LORA_WEIGHT_NAME}."
        )
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME
    if (path / PIPELINE_DIRNAME / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{option}: {str(path)!r} holds a full fine-tune ({PIPELINE_DIRNAME}/), not LoRA weights: render it with "
            f"--model.pretrained_model_name_or_path {path / PIPELINE_DIRNAME} instead."
        )
    raise FileNotFoundError(f"{option}: the folder {str(path)!r} holds no {LORA_WEIGHT_NAME}.")


def load_lora_file(unet: nn.Module, text_encoder: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Load a diffusers LoRA file (as :func:`lora_state_dict` exports it) into the UNet and, when the file has
    text-encoder weights, the text encoder, as peft adapters named ``adapter_name``, in place and frozen.

    The adapters take their rank, alpha and targets from the file's header; under the name ``default`` their weights
    have the keys of adapters that :func:`inject_lora` makes, so a Lightning checkpoint of the same run loads on top.
    """
    from diffusers import StableDiffusionPipeline  # the pipeline class knows the SD 1.x LoRA layout

    path = resolve_lora_file(path)
    state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    if not any(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"model.lora_weights: {str(path)!r} holds no UNet LoRA weights (keys 'unet.*').")
    kw = {"adapter_name": adapter_name, "metadata": metadata}
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet, **kw)
    if any(k.startswith("text_encoder.") for k in state_dict):
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state_dict, network_alphas, text_encoder, prefix="text_encoder", **kw
        )
    for model in (unet, text_encoder):
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
                param.data = param.data.float()
