"""LoRA and its variants through peft, Lightning-free: inject, list trainable weights, get what diffusers saves, load
a LoRA file back (an export folder is read by :mod:`sd.export.folder`; nothing here knows its layout).

Adapters (``model.adapter``): ``lora`` (low-rank ``B A``), ``dora`` (LoRA with a trained magnitude per output row,
peft's ``use_dora``), ``loha`` (LyCORIS' Hadamard product of two low-rank pairs, peft's LoHa) and ``lokr`` (LyCORIS'
Kronecker product, peft's LoKr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.peft_utils import _create_lora_config, get_adapter_name
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from core.errors import ConfigError, InputFileError

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]

AdapterName = Literal["lora", "dora", "loha", "lokr"]
ADAPTERS = ("lora", "dora", "loha", "lokr")
# The fragment of an adapter weight's name, per peft config type (peft's tuner ``prefix``).
_WEIGHT_PREFIX = {LoraConfig: "lora_", LoHaConfig: "hada_", LoKrConfig: "lokr_"}


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> LoraConfig:
    """The peft config; alpha defaults to the rank (scale 1), as in the diffusers DreamBooth LoRA script."""
    return adapter_config("lora", rank, alpha, dropout, target_modules)


def adapter_config(
    adapter: str, rank: int, alpha: float | None, dropout: float, target_modules: list[str]
) -> PeftConfig:
    """The peft config of ``model.adapter``; alpha defaults to the rank (scale alpha / rank = 1) for each kind.

    LoHa and LoKr have no dropout on their branch in peft (only rank and module dropout, other things): a nonzero
    ``model.lora_dropout`` is refused for them rather than silently ignored.
    """
    if adapter not in ADAPTERS:
        raise ConfigError(f"Unknown model.adapter {adapter!r}: choose one of {', '.join(ADAPTERS)}.")
    if rank <= 0:
        raise ConfigError(f"model.lora_rank must be a positive integer, got {rank}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.lora_dropout must be in [0, 1), got {dropout}.")
    alpha = rank if alpha is None else alpha
    targets = list(target_modules)
    if adapter in ("lora", "dora"):
        kw = {"use_dora": True} if adapter == "dora" else {}  # plain LoRA's config exactly as before
        return LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets, **kw
        )
    if dropout:
        raise ConfigError(
            f"model.lora_dropout {dropout} applies to the lora and dora adapters; model.adapter {adapter} has no "
            "dropout on its branch here. Set model.lora_dropout 0."
        )
    config_class = LoHaConfig if adapter == "loha" else LoKrConfig
    # init_weights=True: one factor starts at zero, so the adapted model starts as the base model (as LoRA's B = 0).
    return config_class(r=rank, alpha=alpha, target_modules=targets, init_weights=True)


def adapter_kind(config: PeftConfig) -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr``: the ``model.adapter`` that made a peft config."""
    if isinstance(config, LoraConfig):
        return "dora" if config.use_dora else "lora"
    return "loha" if isinstance(config, LoHaConfig) else "lokr"


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter name is an adapter's weight (any of the four kinds)."""
    return any(prefix in name for prefix in _WEIGHT_PREFIX.values())


def inject_lora(model: nn.Module, config: PeftConfig) -> None:
    """Add a trainable adapter (LoRA, DoRA, LoHa or LoKr) to a frozen diffusers UNet or transformers text encoder, in
    place.

    The base weights stay frozen; the adapter's weights are made float32 so they train in full precision even when the
    base model is held in half precision.
    """
    model.requires_grad_(False)
    add_adapter(model, config, "default")
    prefix = _WEIGHT_PREFIX[type(config)]
    for name, param in model.named_parameters():
        if prefix in name:
            param.requires_grad_(True)
            param.data = param.data.float()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"Adapter target modules {sorted(config.target_modules)} matched no layer of {type(model).__name__}."
        )


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Inject a peft adapter into a diffusers or transformers model, in place, through peft's own API.

    What ``model.add_adapter`` does in diffusers and transformers, without their peft version gates (transformers
    5.25 refuses peft < 0.22 there, though peft's injection is unchanged); the flag they set marks the model as
    holding adapters, so their adapter methods (``set_adapters``, ``disable_lora``, ...) keep working on it.
    """
    inject_adapter_in_model(config, model, adapter_name)
    model._hf_peft_config_loaded = True


def load_text_encoder_lora(
    text_encoder: nn.Module,
    state_dict: dict[str, Tensor],
    network_alphas: dict[str, float] | None,
    metadata: dict | None,
    adapter_name: str | None = None,
    prefix: str = "text_encoder.",
) -> None:
    """Load the ``text_encoder.*`` weights (``prefix``: SDXL's second encoder's are ``text_encoder_2.*``) of a LoRA
    state dict (as ``StableDiffusionPipeline.lora_state_dict`` reads a file) into the text encoder as adapter
    ``adapter_name``, as diffusers' ``load_lora_into_text_encoder`` does, but through peft's API instead of
    transformers' ``load_adapter`` (which adds a peft version gate)."""
    state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state_dict:
        return
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or None
    if network_alphas is not None:
        network_alphas = {k.removeprefix(prefix): v for k, v in network_alphas.items() if k.startswith(prefix)}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; older files have it
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    ranks = {k: v.shape[1] for k, v in state_dict.items() if k.endswith(".lora_B.weight")}
    # diffusers' own helper, so that rank, alpha and targets are read from the file exactly as diffusers reads them.
    config = _create_lora_config(state_dict, network_alphas, metadata, ranks, is_unet=False)
    adapter_name = adapter_name or get_adapter_name(text_encoder)
    add_adapter(text_encoder, config, adapter_name)
    result = set_peft_model_state_dict(text_encoder, state_dict, adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise InputFileError(
            f"LoRA text-encoder weights that fit no layer: {unexpected[:3]} ({len(unexpected)} in all)."
        )


def lora_pipeline_class(unet: nn.Module) -> type:
    """The pipeline class that reads LoRA files for this UNet's family (its layouts, kohya's included)."""
    from sd.models.families import family_of_configs

    return family_of_configs(dict(unet.config), None, "the UNet").pipeline_type()


def load_lora_weights(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    path: str | Path,
    adapter_name: str | None,
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Load a diffusers or kohya LoRA ``.safetensors`` file into the UNet and, when it has text-encoder weights, the
    text encoder(s), as adapters named ``adapter_name`` (diffusers' naming when None), in place."""
    pipeline_class = lora_pipeline_class(unet)  # it knows the family's LoRA layouts (SDXL: lora_te1_ / lora_te2_)
    state_dict, network_alphas, metadata = pipeline_class.lora_state_dict(
        str(path),
        return_lora_metadata=True,
        unet_config=unet.config,  # the UNet's layout for SDXL kohya files
    )
    if not any(k.startswith("unet.") for k in state_dict):
        raise InputFileError(f"model.lora_weights: {str(path)!r} holds no UNet LoRA weights (keys 'unet.*').")
    kw = {"adapter_name": adapter_name, "metadata": metadata}
    pipeline_class.load_lora_into_unet(state_dict, network_alphas, unet, **kw)
    for model, prefix in ((text_encoder, "text_encoder."), (text_encoder_2, "text_encoder_2.")):
        if model is not None:
            load_text_encoder_lora(model, state_dict, network_alphas, metadata, adapter_name, prefix)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in the key layout diffusers' ``save_lora_weights`` / ``load_lora_weights`` use."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))


def lora_metadata(model: nn.Module) -> dict:
    """The adapter's config (rank, alpha, targets), stored in the safetensors header so alpha survives a reload."""
    config = model.peft_config["default"]
    metadata = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "lora_dropout": config.lora_dropout,
    }
    if config.use_dora:  # diffusers builds the LoraConfig from this header: DoRA must say so (plain LoRA's unchanged)
        metadata["use_dora"] = True
    return metadata
