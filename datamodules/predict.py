"""``predict`` data: the prompts to render (from the config or a text file), each with a seed, and an optional
ControlNet condition image. Lightning-free."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from core.errors import InputFileError, InputNotFoundError
from datamodules.images import load_image
from datamodules.validation import ValidationBatch, collate_prompts


class PredictBatch(ValidationBatch):
    """P prompts to render (as in validation), plus the ControlNet condition shared by all of them."""

    control_image: Tensor | None  # (1, 3, H, W) float in [0, 1], or None without a ControlNet


def read_prompts_file(path: str | Path, option: str = "data.predict_prompts_file") -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped. Errors name ``option``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"{option}: {str(path)!r} does not exist (a text file with one prompt per line).")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputFileError(f"{option}: {str(path)!r} holds no prompt (one per line; # starts a comment).")
    return prompts


def load_control_image(path: str | Path, option: str = "data.control_image") -> Tensor:
    """The ControlNet condition image -> (1, 3, H, W) float in [0, 1], at its own size (the pipeline resizes it).

    An unreadable file raises :class:`~datamodules.images.ImageLoadError` (a ValueError) naming ``option`` and the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"{option}: {str(path)!r} does not exist (the ControlNet condition image).")
    try:
        image = load_image(path)
    except ValueError as e:
        raise type(e)(f"{option}: {e}") from e.__cause__
    return (pil_to_tensor(image).float() / 255).unsqueeze(0)  # (1, 3, H, W)


def collate_predict(items: list[dict], control_image: Tensor | None = None) -> PredictBatch:
    """Validation's prompt batch plus the condition image (one copy per batch; the pipeline repeats it)."""
    batch = collate_prompts(items)
    return PredictBatch(**batch, control_image=None if control_image is None else control_image.clone())
