"""Safe image listing, loading and writing, Lightning-free.

Real subject folders hold whatever a camera, a phone or a file manager left there: ``.DS_Store``,
``Thumbs.db``, rotated JPEGs, 16-bit PNGs, palette GIFs with transparency, CMYK scans, half-copied
files. Everything here turns that into RGB images, or fails early with a message that names the file
and says what to do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Files that operating systems and tools drop into folders; never images, whatever their name says.
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
# Background that transparent pixels are composited on.
BACKGROUND = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file and what to do about it."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name.

    Hidden files (``.DS_Store``, ``._photo.jpg`` from macOS, temporary files being written), known junk
    (``Thumbs.db``, ``desktop.ini``), sub-folders and files without an image extension are skipped.
    """
    folder = Path(folder).expanduser()
    found = []
    for path in folder.iterdir():
        name = path.name
        if name.startswith(".") or name.lower() in JUNK_FILES:
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return sorted(found)


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
    try:
        with Image.open(path) as img:
            img.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            img.load()  # decode now, so a truncated file fails here
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.load()
            return rgb
    except Exception as e:  # Pillow raises many types: OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(
            f"Cannot load image {str(path)!r} ({type(e).__name__}: {e}). "
            "The file is corrupt, truncated or not an image: remove or replace it, then run again."
        ) from e


def check_images(paths: Iterable[str | Path], option_name: str) -> None:
    """Load each image once; raise :class:`ImageLoadError` naming the option and the first bad file."""
    for path in paths:
        try:
            load_image(path)
        except ImageLoadError as e:
            raise ImageLoadError(f"{option_name}: {e}") from e.__cause__


def check_image_folder(folder: str | Path, option_name: str) -> list[Path]:
    """Check that ``folder`` (the value of the option ``option_name``) holds loadable images; return them sorted.

    Raises:
        FileNotFoundError: the folder is missing or is not a directory.
        ValueError: it contains no image file.
        ImageLoadError: an image in it cannot be loaded (the first such file is named).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{option_name}: the folder {str(folder)!r} does not exist. Point it at a folder of images."
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{option_name}: {str(folder)!r} is not a folder. Point it at a folder of images.")
    images = list_images(path)
    if not images:
        raise ValueError(
            f"{option_name}: the folder {str(folder)!r} contains no image file. "
            f"Accepted extensions: {', '.join(IMAGE_EXTENSIONS)} (hidden files are ignored)."
        )
    check_images(images, option_name)
    return images


def save_image_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` to ``path`` (format from its extension) so that ``path`` is either absent or complete.

    The image goes to a hidden temporary file with a non-image suffix in the same folder (invisible to
    :func:`list_images`), then is renamed into place; an interrupted run leaves no half-written image.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=Image.registered_extensions()[path.suffix.lower()])
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
