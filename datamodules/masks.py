"""Loss masks of the subject's photos, Lightning-free: where each photo's pixels count in the instance loss.

A mask is a grayscale image beside its photo, ``photo_mask.png`` for ``photo.jpg`` (white: the subject, trained on;
black: ignored; grays weigh in between), or, with ``data.alpha_mask``, the photo's own alpha channel. The loss
(:func:`sd.training.diffusion.dreambooth_loss`) averages each instance row's squared error weighted by its mask,
reduced to the latent grid there; class rows are never masked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from core.errors import InputFileError
from core.safe_files import file_sha256

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
MASK_EXTENSION = ".png"


def mask_file(photo: Path) -> Path:
    """Where the mask of ``photo`` is: ``photo_mask.png`` beside it."""
    return photo.with_name(f"{photo.stem}{MASK_SUFFIX}{MASK_EXTENSION}")


def is_mask_of_a_photo(path: Path, stems: set[str]) -> bool:
    """True for ``X_mask.png`` when a photo with the stem ``X`` is in the same folder (``stems``)."""
    name = path.name
    suffix = MASK_SUFFIX + MASK_EXTENSION
    return name.lower().endswith(suffix) and name[: -len(suffix)] in stems


def _open(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return img
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputFileError(f"{what} {str(path)!r} cannot be read ({e}): replace it with a grayscale PNG.") from None


def load_mask(photo: Path, size: tuple[int, int], alpha_mask: bool) -> Image.Image | None:
    """The mask of ``photo`` (whose size, as loaded, is ``size``) as an 8-bit grayscale image, or None for none.

    Raises:
        InputFileError: naming the mask: unreadable, or of another size than its photo.
    """
    path = mask_file(photo)
    if path.is_file():
        mask = _open(path, "mask")
        if mask.size != size:
            raise InputFileError(
                f"mask {str(path)!r} is {mask.size[0]}x{mask.size[1]} but its photo {photo.name!r} is "
                f"{size[0]}x{size[1]}: save the mask at the photo's size."
            )
        return mask.convert("L") if mask.mode != "L" else mask
    if alpha_mask:
        img = _open(photo, "photo")
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            return img.convert("RGBA").getchannel("A")
    return None


def mask_key(photo: Path, alpha_mask: bool) -> str | None:
    """What ``photo``'s mask is made from, for cache keys, without decoding it: its mask file's SHA-256, ``alpha``
    (its own alpha channel, with ``alpha_mask``: the photo's bytes are keyed already), or None (no mask)."""
    path = mask_file(Path(photo))
    if path.is_file():
        return file_sha256(path)
    return "alpha" if alpha_mask else None


def mask_tensor(mask: Image.Image) -> Tensor:
    """8-bit grayscale -> (1, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def check_masks(photos: Sequence[Path], sizes: Sequence[tuple[int, int]], alpha_mask: bool) -> int:
    """Check every photo's mask (loading it); return how many photos have one. Logs one warning for photos without
    one when some have one, and raises for a mask that weighs nothing (all black: the photo would train nothing)."""
    found = 0
    missing = []
    for photo, size in zip(photos, sizes, strict=True):
        mask = load_mask(photo, size, alpha_mask)
        if mask is None:
            missing.append(photo.name)
            continue
        found += 1
        if mask.getextrema()[1] == 0:
            where = mask_file(photo) if mask_file(photo).is_file() else photo
            raise InputFileError(
                f"mask of {photo.name!r} ({str(where)!r}) is black everywhere: the photo would train nothing. Paint the "
                "subject white, or remove the mask."
            )
    if found and missing:
        log.warning(
            "%d of %d photos have no mask and train on every pixel: %s.",
            len(missing),
            len(photos),
            ", ".join(repr(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    return found
