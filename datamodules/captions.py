"""Per-image captions, Lightning-free: read them where practitioners keep them, fill their placeholders, vary them.

Two conventions are read (one per folder):

- a caption file beside each photo, ``photo.jpg`` + ``photo.txt`` (kohya's sd-scripts);
- one ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` object a line) or ``metadata.csv`` (columns
  ``file_name`` and ``text``) in the folder (Hugging Face's imagefolder). ``caption`` is accepted for ``text``.

A photo without a caption trains on the instance prompt. Captions may name ``{identifier}`` and ``{class_noun}``.
Tag-style captions ("sks dog, red collar, grass") can have their tags shuffled per item (:func:`vary_caption`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from core.errors import ConfigError, InputFileError
from datamodules.prompt_checks import prompt_words

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_EXTENSION = ".txt"
TEXT_COLUMNS = ("text", "caption")


def caption_files(folder: Path, images: Sequence[Path]) -> set[Path]:
    """The files of ``folder`` that hold captions of ``images`` (sidecar ``.txt`` files and metadata files): not photos,
    and not worth a warning about skipped files."""
    stems = {p.stem for p in images}
    found = {folder / name for name in METADATA_FILES if (folder / name).is_file()}
    found |= {p for p in folder.glob(f"*{CAPTION_EXTENSION}") if p.stem in stems and p.is_file()}
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputFileError(
            f"caption file {str(path)!r} is not UTF-8 text (byte {e.start}): save it as UTF-8 (any editor's 'Save as "
            "UTF-8' does it)."
        ) from None
    except OSError as e:
        raise InputFileError(f"caption file {str(path)!r} cannot be read: {e.strerror or e}.") from None


def _checked(caption: str, where: str) -> str:
    caption = " ".join(caption.split())  # one line: newlines and repeated spaces from editors mean nothing
    if not caption:
        raise InputFileError(
            f"{where} is an empty caption: write the photo's caption, or delete it so that the photo trains on "
            "data.instance_prompt."
        )
    return caption


def _metadata_rows(path: Path) -> list[tuple[str, str, str]]:
    """(file name, caption, where) of each row of a metadata file."""
    text = _read_text(path)
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{where} is not a JSON object ({e.msg}): one object per line.") from None
            if not isinstance(record, dict):
                raise InputFileError(f'{where} is not a JSON object: write {{"file_name": ..., "text": ...}}.')
            rows.append((record.get("file_name"), _column(record, where), where))
    else:
        reader = csv.DictReader(io.StringIO(text))
        for n, record in enumerate(reader, start=2):
            rows.append(
                (record.get("file_name"), _column(record, f"{str(path)!r} line {n}"), f"{str(path)!r} line {n}")
            )
    return rows


def _column(record: dict, where: str) -> str:
    if not isinstance(record.get("file_name"), str):
        raise InputFileError(f"{where} has no file_name: each row names its photo (file_name) and its caption (text).")
    for column in TEXT_COLUMNS:
        if isinstance(record.get(column), str):
            return record[column]
    raise InputFileError(f"{where} has no caption: give it a 'text' (or 'caption') value.")


def read_captions(folder: str | Path, images: Sequence[Path], option_name: str) -> list[str | None]:
    """The caption of each of ``images`` (photos directly in ``folder``), or None where it has none.

    Raises:
        InputFileError: naming the file (and line): two conventions in one folder, a caption file not UTF-8, an empty
            caption, a metadata row without file name or caption, one naming no photo of the folder or a photo twice.
    """
    folder = Path(folder).expanduser()
    metadata = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    sidecars = {p.stem: p for p in caption_files(folder, images) if p.suffix == CAPTION_EXTENSION}
    if len(metadata) > 1 or (metadata and sidecars):
        given = [p.name for p in metadata] + sorted(p.name for p in sidecars.values())[:3]
        raise InputFileError(
            f"{option_name}: the folder {str(folder)!r} holds captions in more than one form ({', '.join(given)}): "
            "keep either a .txt beside each photo or one metadata.jsonl / metadata.csv."
        )
    if not metadata:
        return [
            _checked(_read_text(sidecars[p.stem]), repr(str(sidecars[p.stem]))) if p.stem in sidecars else None
            for p in images
        ]
    by_name = {p.name: i for i, p in enumerate(images)}
    captions: list[str | None] = [None] * len(images)
    for name, caption, where in _metadata_rows(metadata[0]):
        index = by_name.get(Path(name).name if Path(name).parent == Path(".") else name)
        if index is None:
            raise InputFileError(
                f"{where} names {name!r}, which is not a photo in {str(folder)!r}: fix the name or remove the row."
            )
        if captions[index] is not None:
            raise InputFileError(f"{where} gives {name!r} a second caption: keep one row per photo.")
        captions[index] = _checked(caption, where)
    return captions


def fill_caption(caption: str, identifier: str, class_noun: str) -> str:
    """Replace ``{identifier}`` and ``{class_noun}`` (other braces are kept: captions are not format strings)."""
    return caption.replace("{identifier}", identifier).replace("{class_noun}", class_noun)


def uses_class_noun(captions: Sequence[str | None]) -> bool:
    return any(c is not None and "{class_noun}" in c for c in captions)


def identifier_nowhere_message(captions: Sequence[str], identifier: str, option_name: str) -> str | None:
    """A warning when no caption names the identifier (the subject would be learnt under no word of its own)."""
    words = prompt_words(identifier)  # "<sks>" -> {"sks"}: tokens like it are matched by their word
    if any(words and words <= prompt_words(c) for c in captions):
        return None
    return (
        f"{option_name}: the identifier {identifier!r} (data.identifier) appears in no caption, so no word names the "
        "subject and the prompts that use it will not show it. Put {identifier} (or the identifier itself) in the "
        "captions, e.g. 'a photo of {identifier} {class_noun}, red collar'."
    )


def check_caption_options(caption_dropout: float, keep_tags: int) -> None:
    if not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout is a probability in [0, 1), got {caption_dropout}.")
    if keep_tags < 0:
        raise ConfigError(f"data.keep_tags must be >= 0, got {keep_tags}.")


def vary_caption(caption: str, shuffle_tags: bool, keep_tags: int, caption_dropout: float) -> str:
    """The caption an item trains on: tags after the first ``keep_tags`` shuffled, or with probability
    ``caption_dropout`` the empty prompt. Draws from torch's CPU generator (seeded per item by
    :class:`~datamodules.resumable.SeededItems`, so a resumed run draws the same), and nothing when both are off."""
    if shuffle_tags:
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        kept, rest = tags[:keep_tags], tags[keep_tags:]
        if len(rest) > 1:
            rest = [rest[i] for i in torch.randperm(len(rest)).tolist()]
        caption = ", ".join(kept + rest)
    if caption_dropout > 0 and float(torch.rand(())) < caption_dropout:
        return ""
    return caption
