"""Memory and speed switches for the UNet, Lightning-free.

Each is a ``model.*`` option; the README's "Memory and speed" section gives their measured effect.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

AttentionName = Literal["sdpa", "eager"]


def set_attention(unet: nn.Module, attention: AttentionName) -> None:
    """``sdpa``: torch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels where the device has
    them; diffusers' default on torch 2). ``eager``: matmul, softmax, matmul, which holds the whole
    (heads, tokens, tokens) attention matrix; for comparison and debugging."""
    if attention == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"Unknown model.attention {attention!r}: choose 'sdpa' or 'eager'.")


def apply_unet_savers(unet: nn.Module, attention: AttentionName, channels_last: bool, compile_unet: bool) -> None:
    """Set the attention kernel, the memory format and compilation of a UNet, in place.

    ``channels_last`` stores conv weights (and the module's inputs, see :func:`to_memory_format`) as NHWC, which
    convolution kernels on GPUs with tensor cores and on x86 CPUs (oneDNN) run faster. ``compile_unet`` compiles the
    UNet's forward with ``torch.compile`` in place (``nn.Module.compile``), so parameter names, checkpoints and
    exports stay as they are; the first steps are slow while it compiles.
    """
    set_attention(unet, attention)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C, h, w) input in the UNet's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
