"""Diffusers weights -> the original Stable Diffusion 1.x / 2.x checkpoint layout (CompVis / LDM), Lightning-free.

diffusers reads that layout (``from_single_file``, ``diffusers.loaders.single_file_utils.convert_ldm_*``) but ships
no writer in the package (only a hard-coded script for the full-size SD 1.x), so the reverse mapping lives here,
derived from the model configs so that it fits any SD 1.x-shaped model, the tiny built-in one included:

- UNet -> ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- VAE -> ``first_stage_model.*`` (``encoder.down.{i}.block.{j}``, attention as 1x1 convolutions),
- CLIP text encoder -> ``cond_stage_model.transformer.text_model.*`` (SD 1.x), or the OpenCLIP text encoder ->
  ``cond_stage_model.model.*`` with fused q / k / v projections (SD 2.x);
- SDXL (Stability AI's ``sgm`` layout): CLIP ViT-L -> ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP
  bigG -> ``conditioner.embedders.1.model.*`` (with its ``text_projection``), the UNet's added-conditioning MLP ->
  ``model.diffusion_model.label_emb.0.*``.

This is what AUTOMATIC1111, ComfyUI and ``StableDiffusionPipeline.from_single_file`` load. Every key is mapped
or the conversion fails: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x's OpenCLIP text encoder
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG

# Inside a UNet ResNet block: diffusers name -> LDM name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Inside a VAE attention block: diffusers name -> LDM name (LDM uses 1x1 convolutions, diffusers linear layers).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str] | None = None) -> str | None:
    """Replace the longest matching block prefix of ``key``, then the first layer name inside the block."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            for name, new_name in (inner or {}).items():
                if rest.startswith(name + "."):
                    rest = new_name + rest[len(name) :]
                    break
            return prefixes[old] + rest
    return None


def unet_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Block prefixes of a diffusers ``UNet2DConditionModel`` (from its config) -> LDM ``openaimodel.UNetModel``.

    LDM numbers the blocks flatly: ``input_blocks.0`` is ``conv_in``, then each level has ``layers_per_block``
    ResNet (+ attention) blocks and, except the last level, a downsampler; the output side mirrors it with one
    extra block per level, the upsampler sitting after the attention of the level's last block.
    """
    per_level = config["layers_per_block"]
    per_level = per_level if isinstance(per_level, int) else per_level[0]
    levels = len(config["block_out_channels"])
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: the MLP of the pooled embedding and time ids
        prefixes |= {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    for i in range(levels):
        for j in range(per_level):
            block = 1 + i * (per_level + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{block}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per_level + 1)}.0.op."
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per_level + 1):
            block = i * (per_level + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{block}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{block}.1."
        last = i * (per_level + 1) + per_level
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{last}.{2 if has_attention else 1}."
    return prefixes


def unet_to_original(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers UNet state dict in the original layout, keys prefixed with ``model.diffusion_model.``."""
    prefixes = unet_key_map(config)
    out = {}
    for key, value in state_dict.items():
        inner = _UNET_RESNET if ".resnets." in key else None
        new = _rename(key, prefixes, inner)
        if new is None:
            raise KeyError(f"UNet weight {key!r} has no name in the original Stable Diffusion layout.")
        out[UNET_PREFIX + new] = value
    return out


def vae_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Block prefixes of a diffusers ``AutoencoderKL`` -> LDM ``AutoencoderKL`` (decoder levels are reversed)."""
    levels = len(config["block_out_channels"])
    prefixes = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for part in ("encoder", "decoder"):
        for name in ("conv_in.", "conv_out."):
            prefixes[f"{part}.{name}"] = f"{part}.{name}"
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for name in ("quant_conv.", "post_quant_conv."):
        prefixes[name] = name
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{levels - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    return prefixes


def vae_to_original(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers VAE state dict in the original layout, keys prefixed with ``first_stage_model.``."""
    prefixes = vae_key_map(config)
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, prefixes, _VAE_ATTENTION if ".attentions." in key else None)
        if new is None:
            raise KeyError(f"VAE weight {key!r} has no name in the original Stable Diffusion layout.")
        if ".resnets." in key:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) convolution
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_original(state_dict: Mapping[str, Tensor], prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, Tensor]:
    """A transformers ``CLIPTextModel`` state dict in the original layout (``cond_stage_model.transformer.*``; SDXL's
    first encoder: ``prefix`` ``conditioner.embedders.0.transformer.``).

    transformers >= 5.6 dropped the ``text_model.`` level of ``CLIPTextModel``; the original layout keeps it.
    """
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): value
        for key, value in state_dict.items()
    }


# Inside an OpenCLIP residual block: transformers' CLIP name -> OpenCLIP name (q / k / v are fused apart from these).
_OPENCLIP_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def text_encoder_to_openclip(state_dict: Mapping[str, Tensor], prefix: str = OPENCLIP_PREFIX) -> dict[str, Tensor]:
    """An SD 2.x text encoder (transformers ``CLIPTextModel``) in the original OpenCLIP layout (``cond_stage_model.model.*``;
    SDXL's second encoder, a ``CLIPTextModelWithProjection``: ``prefix`` ``conditioner.embedders.1.model.``).

    The inverse of diffusers' ``convert_open_clip_checkpoint``: each layer's q / k / v projections are concatenated into
    ``attn.in_proj_weight`` / ``in_proj_bias`` in that order, and a projection is written as OpenCLIP's
    ``text_projection`` (width x embedding: the transposed linear weight). The SD 2.x diffusers model holds the 23
    layers that SD 2.x uses (the penultimate layer's output); the original's unused 24th layer and ``text_projection``
    have no counterpart and are not written (AUTOMATIC1111, ComfyUI and diffusers load the file without them, and never
    use them).
    """
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key == "text_projection.weight":  # (embedding, width) linear -> OpenCLIP's (width, embedding) matrix
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        name = key.removeprefix("text_model.")
        if name in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[name]] = value
            continue
        if name == "embeddings.position_ids":  # a buffer, not a weight
            continue
        parts = name.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise KeyError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        block = f"{prefix}transformer.resblocks.{parts[2]}."
        inner = ".".join(parts[3:])
        if inner.startswith("self_attn.") and inner.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            kind = inner.split(".")[-1]  # weight or bias
            fused.setdefault(f"{block}attn.in_proj_{kind}", {})[inner.split(".")[1]] = value
            continue
        for old, new in _OPENCLIP_BLOCK.items():
            if inner.startswith(old + "."):
                out[block + new + inner[len(old) :]] = value
                break
        else:
            raise KeyError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
    for key, qkv in fused.items():
        if set(qkv) != {"q_proj", "k_proj", "v_proj"}:
            raise KeyError(f"{key}: the text encoder lacks {sorted({'q_proj', 'k_proj', 'v_proj'} - set(qkv))}")
        out[key] = torch.cat([qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]], dim=0)
    return out


def to_original_layout(
    unet_state_dict: Mapping[str, Tensor],
    unet_config: Mapping[str, Any],
    vae_state_dict: Mapping[str, Tensor],
    vae_config: Mapping[str, Any],
    text_encoder_state_dict: Mapping[str, Tensor],
    text_encoder_layout: str = "clip",
    text_encoder_2_state_dict: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One state dict in the layout of the original checkpoints (``v1-5-pruned.safetensors``, ``v2-1_768-ema-pruned``,
    ``sd_xl_base_1.0.safetensors``).

    ``text_encoder_layout`` is the family's (:class:`sd.models.families.Family`): ``clip`` for SD 1.x,
    ``openclip`` for SD 2.x, ``sdxl`` (both encoders; ``text_encoder_2_state_dict`` the second's) for SDXL.
    """
    if text_encoder_layout not in ("clip", "openclip", "sdxl"):
        raise ValueError(f"unknown text encoder layout {text_encoder_layout!r}")
    if text_encoder_layout == "sdxl":
        if text_encoder_2_state_dict is None:
            raise ValueError("the SDXL layout needs the second text encoder's weights")
        text = text_encoder_to_original(text_encoder_state_dict, SDXL_CLIP_PREFIX)
        text |= text_encoder_to_openclip(text_encoder_2_state_dict, SDXL_OPENCLIP_PREFIX)
    elif text_encoder_layout == "openclip":
        text = text_encoder_to_openclip(text_encoder_state_dict)
    else:
        text = text_encoder_to_original(text_encoder_state_dict)
    return {
        **unet_to_original(unet_state_dict, unet_config),
        **vae_to_original(vae_state_dict, vae_config),
        **text,
    }
