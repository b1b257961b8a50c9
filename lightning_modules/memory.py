"""Memory and speed switches for the UNet, Lightning-free.

Each is a ``model.*`` option; the README's "Memory and speed" section gives their measured effect.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from core.errors import ConfigError

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
        raise ConfigError(f"Unknown model.attention {attention!r}: choose 'sdpa' or 'eager'.")


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


def _file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``*.safetensors`` files (Linux; empty elsewhere)."""
    ranges = []
    try:
        lines = open("/proc/self/maps").read().splitlines()  # noqa: SIM115 - read at once
    except OSError:
        return ranges
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def _drop_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Tell the kernel that the pages of a weight read from a memory-mapped weight file are no longer needed.

    Loaders map ``*.safetensors`` files and hand out tensors that live in the mapping; the pages read stay
    resident until the whole file is unmapped, i.e. until the last weight of the file is gone. After a weight is
    replaced by a copy (a cast), its own pages can go at once. Only whole pages inside the tensor, inside a
    ``*.safetensors`` mapping, are released; nothing else is touched.
    """
    import ctypes
    import mmap

    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen (``requires_grad`` false) weights of ``model`` to ``dtype`` in place, one at a time.

    Each float32 weight read from a memory-mapped file gives its pages back as soon as its half-precision copy
    exists, so the cast never holds the float32 and the half-precision model at once (for the SD 1.5 UNet: 3.2 GiB
    + 1.6 GiB otherwise).
    """
    mappings = _file_mappings()
    for param in model.parameters():
        if param.requires_grad or param.dtype == dtype:
            continue
        old = param.data
        param.data = old.to(dtype)
        if mappings:
            _drop_file_pages(old, mappings)
        del old


def release_freed_cpu_memory() -> bool:
    """glibc (Linux) only: hand freed CPU memory back to the operating system from now on, and what is free now.

    By default glibc keeps freed memory for reuse, so a process's resident memory grows to the sum of every phase's
    peak (caches, loading, the first steps). Setting its trim threshold to 0 and its mmap threshold to 64 KiB returns
    memory when it is freed; it costs some speed in allocation (page faults). Returns whether it applied.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 0)
    libc.mallopt(m_mmap_threshold, 1 << 16)
    libc.malloc_trim(0)
    return True
