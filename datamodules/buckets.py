"""Aspect-ratio buckets, Lightning-free: which size each photo trains at, and where it is cropped.

Square crops cut off what is near the edge of a wide or tall photo. With buckets (``data.buckets``) a photo trains at
the bucket nearest its aspect ratio, among sizes of (about) the pixel area of ``resolution`` squared whose sides are
multiples of a step; every batch comes from one bucket, so its tensors stack.

- The step is what the model needs: the UNet halves the latent grid once per down block after the first and the VAE
  divides pixels by its own factor, so a side must be a multiple of ``vae_factor * 2 ** (unet_blocks - 1)``: 8 x 8 =
  64 for Stable Diffusion 1.x / 2.x (what kohya's sd-scripts and the diffusers bucketing PRs use), 4 x 2 = 8 for the
  toy model (32 px, 8 x 8 latents), whose 32 px would leave a 64 px step no bucket but the square.
- The buckets (:func:`make_buckets`): for each width ``w`` (a multiple of the step) the largest height ``h`` (a
  multiple of the step) with ``h * w <= resolution ** 2``, and the mirror sizes, up to an aspect ratio of
  ``max_ratio``; the square ``resolution`` x ``resolution`` is one of them.
- A photo goes to the bucket nearest its aspect ratio (in log ratio: 2:1 and 1:2 are as far from the square); it is
  resized so that it covers the bucket (the smaller scale that fills both sides) and cropped to it, centered or at
  random. With ``no_upscale`` a photo smaller in area than ``resolution ** 2`` is not enlarged: it trains at its own
  size rounded down to the step (a bucket of its own size).
- What each row really had goes with it (SDXL conditions on it): the photo's size as read, (height, width), and the
  crop's top-left corner in the resized photo, (top, left), counted in the flipped image when it was flipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from core.errors import ConfigError

Size = tuple[int, int]  # (height, width) in pixels
DEFAULT_STEP = 64  # Stable Diffusion's 8 x 8 (VAE x UNet), used when a model's configs are not at hand


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[Size]:
    """Bucket sizes (height, width), sides multiples of ``step``, area at most ``resolution ** 2`` (the largest
    height for each width), aspect ratios up to ``max_ratio`` either way; sorted by aspect ratio (height / width)."""
    area = resolution * resolution
    found: set[Size] = set()
    for width in range(step, resolution * int(math.ceil(max_ratio)) + step, step):
        height = (area // width) // step * step
        if height < step:
            break
        if max(width / height, height / width) <= max_ratio + 1e-9:
            found |= {(height, width), (width, height)}
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket nearest in aspect ratio to ``size`` (height, width), by |log ratio| (the larger area on a tie)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def photo_bucket(size: Size, buckets: Sequence[Size], resolution: int, step: int, no_upscale: bool) -> Size | None:
    """The bucket of a photo of ``size`` (height, width): the nearest of ``buckets``, or with ``no_upscale`` and an
    area under ``resolution ** 2``, its own size rounded down to ``step`` (None when a side is under one step)."""
    if no_upscale and size[0] * size[1] < resolution * resolution:
        own = (size[0] // step * step, size[1] // step * step)
        return own if min(own) > 0 else None
    return nearest_bucket(size, buckets)


def assign_buckets(
    sizes: Sequence[Size],
    paths: Sequence[Path],
    resolution: int,
    step: int,
    max_ratio: float,
    no_upscale: bool,
    option_name: str,
) -> list[Size]:
    """Each photo's bucket (sizes are (height, width) as read); a photo left with no bucket fails, naming it."""
    buckets = make_buckets(resolution, step, max_ratio)
    out = []
    for size, path in zip(sizes, paths, strict=True):
        bucket = photo_bucket(size, buckets, resolution, step, no_upscale)
        if bucket is None:
            raise ConfigError(
                f"{option_name}: {str(path)!r} is {size[1]} x {size[0]} pixels, smaller than one bucket step "
                f"(data.bucket_step={step}) on a side, so data.bucket_no_upscale leaves it no bucket. Use a larger "
                "photo, remove it, or set data.bucket_no_upscale false (it is then enlarged)."
            )
        out.append(bucket)
    return out


def check_bucket_options(resolution: int, step: int | None, max_ratio: float) -> None:
    """Bucket settings that cannot work fail before anything loads, naming the option."""
    if max_ratio < 1:
        raise ConfigError(f"data.bucket_max_ratio must be at least 1 (1: the square only), got {max_ratio}.")
    if step is not None and (step <= 0 or resolution % step):
        raise ConfigError(
            f"data.bucket_step must be a positive divisor of data.resolution={resolution}, got {step} (e.g. 64 for "
            "Stable Diffusion at 512 px)."
        )


def _blocks(config_path: Path) -> int | None:
    import json

    try:
        return len(json.loads(config_path.read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_step(model_path: str) -> int:
    """The side step a model needs (VAE factor x UNet downsampling), from a diffusers folder's configs; 64 (Stable
    Diffusion's) when they are not at hand (a single file, a hub id)."""
    folder = Path(model_path)
    vae, unet = _blocks(folder / "vae" / "config.json"), _blocks(folder / "unet" / "config.json")
    if vae is None or unet is None:
        return DEFAULT_STEP
    return 2 ** (vae - 1) * 2 ** (unet - 1)


def resolve_step(step: int | None, model_path: str, resolution: int) -> int:
    """``data.bucket_step``, or the model's step when it is None; it must be a multiple of the model's step."""
    need = model_step(model_path)
    chosen = need if step is None else step
    if chosen % need:
        raise ConfigError(
            f"data.bucket_step={chosen} is not a multiple of {need}, which this model needs (its VAE's downscale "
            "times its UNet's): latents of other sizes do not pass through the UNet. Use a multiple of it."
        )
    if resolution % chosen:
        raise ConfigError(
            f"data.resolution={resolution} is not a multiple of the bucket step {chosen} (data.bucket_step, or the "
            "model's): set data.bucket_step to a divisor of it, or another resolution."
        )
    return chosen


@dataclass(frozen=True)
class Crop:
    """Where a photo of ``original`` size is cut for its bucket: resized to ``resized``, cropped at (top, left) of
    the resized image (of the flipped image when ``flip``); all (height, width) / (top, left) in pixels."""

    original: Size
    resized: Size
    top: int
    left: int
    bucket: Size
    flip: bool

    @property
    def top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized (and, if flipped, flipped) image: SDXL's crop coordinates."""
        left = self.resized[1] - self.left - self.bucket[1] if self.flip else self.left
        return self.top, left


def plan_crop(original: Size, bucket: Size, center_crop: bool, random_flip: bool) -> Crop:
    """Resize to cover ``bucket``, then the crop (center, or at random from torch's generator) and the flip (with
    probability 0.5, drawn after the crop), as :func:`apply_crop` carries them out."""
    h, w = original
    scale = max(bucket[0] / h, bucket[1] / w)
    resized = (max(bucket[0], round(h * scale)), max(bucket[1], round(w * scale)))
    if center_crop:
        top = int(round((resized[0] - bucket[0]) / 2.0))
        left = int(round((resized[1] - bucket[1]) / 2.0))
    else:
        top = int(torch.randint(0, resized[0] - bucket[0] + 1, (1,)))
        left = int(torch.randint(0, resized[1] - bucket[1] + 1, (1,)))
    flip = bool(torch.rand(1) < 0.5) if random_flip else False
    return Crop(original, resized, top, left, bucket, flip)


def apply_crop(image: Image.Image, crop: Crop, interpolation=InterpolationMode.BILINEAR) -> Image.Image:
    """The photo (or its mask) resized, cropped and flipped as ``crop`` says."""
    out = F.resize(image, list(crop.resized), interpolation=interpolation, antialias=True)
    out = F.crop(out, crop.top, crop.left, crop.bucket[0], crop.bucket[1])
    return F.hflip(out) if crop.flip else out


def to_pixels(image: Image.Image) -> Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1]."""
    return F.normalize(F.to_tensor(image), [0.5], [0.5])


def geometry(crop: Crop) -> Tensor:
    """A row's (4,) long geometry, as every dataset's items carry it: original size (height, width) and crop top-left
    (top, left); the collate functions stack it into the batch's ``original_sizes`` and ``crop_top_lefts``."""
    return torch.tensor([*crop.original, *crop.top_left], dtype=torch.long)


def bucket_pixels(image: Image.Image, bucket: Size) -> Tensor:
    """(3, h, w) pixels in [-1, 1] of ``image`` at ``bucket``, center-cropped, unflipped (what cached latents hold)."""
    return to_pixels(apply_crop(image, plan_crop((image.height, image.width), bucket, True, False)))
