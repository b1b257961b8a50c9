"""Safe image listing, loading and writing, Lightning-free.

Real subject folders hold whatever a camera, a phone or a file manager left there: ``.DS_Store``,
``Thumbs.db``, rotated JPEGs, 16-bit PNGs, palette GIFs with transparency, CMYK scans, half-copied
files. Everything here turns that into RGB images, or fails early with a message that names the file
and says what to do. The policy (what is an error, what is skipped, what only warns) is in docs/bad_inputs.md.

Decompression bombs: importing this module sets Pillow's ``Image.MAX_IMAGE_PIXELS`` to :data:`MAX_IMAGE_PIXELS`
(16384 x 16384, three times Pillow's default, so that large legitimate photos such as 8K ones load), and
:func:`load_image` refuses an image whose header claims more pixels before decoding any of them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from core.errors import InputFileError, InputNotFoundError
from core.safe_files import atomic_write
from datamodules.masks import is_mask_of_a_photo

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Files that operating systems and tools drop into folders; never images, whatever their name says.
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
# Background that transparent pixels are composited on.
BACKGROUND = (255, 255, 255)
# Largest image accepted, in pixels: 16K x 16K (268 MP). An 8K photo (7680 x 4320) is 33 MP; decoding the limit
# takes about 0.8 GB as RGB. A small file claiming more is a decompression bomb.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)  # Pillow's own guard, at 2x this

log = logging.getLogger(__name__)


class ImageLoadError(InputFileError):
    """An image file could not be read; the message names the file and what to do about it."""


class ImageTooLargeError(ImageLoadError):
    """An image claims more than :data:`MAX_IMAGE_PIXELS` pixels (possibly a decompression bomb)."""


def _is_skipped_silently(path: Path) -> bool:
    """Hidden files and the junk that operating systems leave in folders."""
    return path.name.startswith(".") or path.name.lower() in JUNK_FILES


def non_image_files(folder: str | Path) -> list[Path]:
    """Files in ``folder`` that :func:`list_images` skips for their extension (not hidden files or OS junk, nor the
    photos' caption files: see :mod:`datamodules.captions`)."""
    from datamodules.captions import caption_files

    folder = Path(folder).expanduser()
    captions = caption_files(folder, list_images(folder))
    return sorted(
        p
        for p in folder.iterdir()
        if not _is_skipped_silently(p)
        and p.suffix.lower() not in IMAGE_EXTENSIONS
        and not p.is_dir()
        and p not in captions
    )


def broken_links(folder: str | Path) -> list[Path]:
    """Symbolic links in ``folder`` with an image name whose target is missing (or a loop)."""
    folder = Path(folder).expanduser()
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_symlink() and not p.exists() and not _is_skipped_silently(p) and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name.

    Hidden files (``.DS_Store``, ``._photo.jpg`` from macOS, temporary files being written), known junk
    (``Thumbs.db``, ``desktop.ini``), sub-folders, broken symbolic links, files without an image extension and the
    loss masks of photos (``photo_mask.png`` beside ``photo.jpg``, see :mod:`datamodules.masks`) are skipped. Symbolic links to images are followed.
    """
    folder = Path(folder).expanduser()
    found = []
    for path in folder.iterdir():
        if _is_skipped_silently(path):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    stems = {p.stem for p in found}
    return sorted(p for p in found if not is_mask_of_a_photo(p, stems))  # photo_mask.png is photo.jpg's loss mask


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit / 32-bit grayscale: Pillow's own conversion clips at 255 (a white image), so rescale.
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            peak = 65535.0
        elif mode == "F":
            peak = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        else:  # "I": 32-bit ints, in practice 16-bit PNG/TIFF data
            peak = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(path: str | Path) -> Image.Image:
    """Load an image file as an RGB ``PIL.Image``, fully decoded.

    Applies the EXIF orientation (photos from phones are often stored sideways), takes the first frame of
    animated images, and converts every mode (RGBA / LA / palette with transparency composited on white,
    CMYK, 16-bit grayscale, grayscale) to RGB. A truncated or unreadable file raises
    :class:`ImageLoadError` here rather than in the middle of training.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageLoadError(f"Cannot load image {str(path)!r}: the file is empty (0 bytes). Remove or replace it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a clearer message
            img = Image.open(path)
        with img:
            _check_pixel_count(img.size, path)  # from the header, before decoding
            img.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            img.load()  # decode now, so a truncated file fails here
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.load()
            return rgb
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:  # more than twice the limit: Pillow refuses in open()
        pillow_limit = f"more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels by its header"
        raise ImageTooLargeError(_too_large_message(path, pillow_limit)) from e
    except Exception as e:  # Pillow raises many types: OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(
            f"Cannot load image {str(path)!r} ({type(e).__name__}: {e}). "
            "The file is corrupt, truncated or not an image: remove or replace it, then run again."
        ) from e


def displayed_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as :func:`load_image` gives it (EXIF rotation applied), read from its header."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that turn the image by 90 degrees
            width, height = height, width
    return width, height


def _too_large_message(path: Path, size: str) -> str:
    return (
        f"Cannot load image {str(path)!r}: it is {size}, more than the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} "
        "megapixels (16384 x 16384). A file that claims such a size can exhaust memory when decoded (a "
        "'decompression bomb'). Downscale it (an 8K photo is 33 megapixels; training uses a few hundred pixels a "
        "side), or remove it."
    )


def _check_pixel_count(size: tuple[int, int], path: Path) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(_too_large_message(path, f"{width} x {height} pixels"))


def check_images(paths: Iterable[str | Path], option_name: str) -> list[tuple[int, int]]:
    """Load each image once; return their (width, height) as displayed (after EXIF rotation).

    Raises:
        ImageLoadError: naming the option and the first bad file.
    """
    sizes = []
    for path in paths:
        try:
            sizes.append(load_image(path).size)
        except ImageLoadError as e:
            raise type(e)(f"{option_name}: {e}") from e.__cause__
    return sizes


def _names(paths: list[Path], limit: int = 5) -> str:
    shown = ", ".join(repr(p.name) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_image_folder(
    folder: str | Path, option_name: str, min_side: int | None = None, warn: bool = True
) -> list[Path]:
    """Check that ``folder`` (the value of the option ``option_name``) holds loadable images; return them sorted.

    With ``warn``, logs a warning for files skipped for their extension (e.g. ``.txt``, ``.heic``) and, given
    ``min_side`` (the training resolution), for images whose shorter side is smaller (they are upscaled).

    Raises:
        FileNotFoundError: the folder is missing or is not a directory, or an image name in it is a broken link.
        ValueError: it contains no image file.
        ImageLoadError: an image in it cannot be loaded (the first such file is named).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise InputNotFoundError(
            f"{option_name}: the folder {str(folder)!r} does not exist. Point it at a folder of images."
        )
    if not path.is_dir():
        raise InputNotFoundError(f"{option_name}: {str(folder)!r} is not a folder. Point it at a folder of images.")
    broken = broken_links(path)
    if broken:
        raise InputNotFoundError(
            f"{option_name}: {str(broken[0])!r} is a symbolic link to {os.readlink(broken[0])!r}, which does not "
            "exist. Fix the link or remove it."
        )
    images = list_images(path)
    skipped = non_image_files(path)
    if not images:
        raise InputFileError(
            f"{option_name}: the folder {str(folder)!r} contains no image file. "
            f"Accepted extensions: {', '.join(IMAGE_EXTENSIONS)} (hidden files are ignored)."
            + (f" Skipped: {_names(skipped)}." if skipped else "")
        )
    sizes = check_images(images, option_name)
    if warn and skipped:
        log.warning(
            "%s: skipping %d files that are not images by their extension: %s. Accepted: %s; convert other photo "
            "formats (e.g. HEIC, RAW) to JPEG or PNG to use them.",
            option_name,
            len(skipped),
            _names(skipped),
            ", ".join(IMAGE_EXTENSIONS),
        )
    small = [(p, s) for p, s in zip(images, sizes, strict=True) if min_side and min(s) < min_side]
    if warn and small:
        log.warning(
            "%s: %d of the images are smaller than data.resolution=%d on their shorter side and are upscaled "
            "(blurrier training images): %s. Use larger photos, or a lower resolution.",
            option_name,
            len(small),
            min_side,
            ", ".join(f"{p.name!r} ({w}x{h})" for p, (w, h) in small[:5]) + (" ..." if len(small) > 5 else ""),
        )
    return images


def save_image_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` (format from its extension) so that ``path`` is either absent or complete.

    The image goes to a hidden temporary file with a non-image suffix in the same folder (invisible to
    :func:`list_images`), then is renamed into place; an interrupted run leaves no half-written image.
    """
    path = Path(path)
    with atomic_write(path) as f:
        img.save(f, format=Image.registered_extensions()[path.suffix.lower()])
    return path
