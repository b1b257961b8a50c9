"""Every bad input of the hardening issue, generated here, through the DataModule (files) or the CLI (options).

Each file case is a folder holding one good photo and the case's file(s); the outcome is one of:
- ``ok``: the file is used (converted to RGB) and the loader yields finite batches in [-1, 1];
- ``skip``: the file is ignored silently (hidden files, OS junk) or with a warning (unknown extension);
- ``warn``: the file is used, with a warning (e.g. smaller than the resolution: upscaled);
- ``error``: preparing the data fails, before any model loads, with a message naming the file and what to do.
The policy and its reasons are in docs/bad_inputs.md.
"""

from __future__ import annotations

import logging
import re
import struct
import time
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import lightning_modules.dreambooth
import sd.models.loading
from core.errors import UserInputError
from datamodules import DreamBoothDataModule
from datamodules.images import ImageLoadError, ImageTooLargeError, load_image
from train import cli_main

RES = 64
PROMPT, CLASS = "a photo of sks ball", "a photo of ball"


# ----------------------------------------------------------------------------------------------- the corpus
def _photo(size=(96, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and header claiming width x height, and no pixel data: a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _truncated_jpeg(path: Path) -> None:
    _photo().save(path.with_suffix(".full"), format="JPEG")
    data = path.with_suffix(".full").read_bytes()
    path.with_suffix(".full").unlink()
    path.write_bytes(data[: len(data) // 2])


def _mode(mode: str, ext: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        if mode == "P":
            img = Image.new("P", (80, 80), 1)
            img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
            img.info["transparency"] = 0
        elif mode == "I;16":
            img = Image.fromarray(np.linspace(0, 65535, 80 * 80).reshape(80, 80).astype(np.uint16))
        else:
            img = _photo().convert(mode)
        img.save(path)

    make.__name__ = f"{mode}.{ext}"
    return make


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    _photo((120, 80)).save(path, exif=exif.tobytes())


def _animated(path: Path) -> None:
    frames = [_photo(seed=s) for s in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _symlink_to_photo(path: Path) -> None:
    target = path.parent.parent / f"elsewhere_{path.parent.name}.png"
    _photo().save(target)
    path.symlink_to(target)


@dataclass
class Case:
    files: dict[str, Callable[[Path], None]]  # name -> writer
    outcome: str  # ok, skip, warn, error
    match: str = ""  # regex on the warning or error
    error: type[Exception] = ImageLoadError
    used: int = 2  # images used when not an error: the good photo and the case's


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


CASES: dict[str, Case] = {
    "zero-byte file": Case({"empty.jpg": _write(b"")}, "error", r"empty\.jpg.*empty \(0 bytes\).*Remove or replace"),
    "truncated JPEG": Case({"cut.jpg": _truncated_jpeg}, "error", r"cut\.jpg.*truncated.*remove or replace"),
    "text file named .jpg": Case({"notes.jpg": _write(b"shopping list")}, "error", r"notes\.jpg.*not an image"),
    "hidden and OS junk files": Case(
        {
            ".DS_Store": _write(b"\0\1"),
            "Thumbs.db": _write(b"x"),
            "desktop.ini": _write(b"[x]"),
            "._p.jpg": _write(b""),
        },
        "skip",
        used=1,
    ),
    "non-image files": Case(
        {"notes.txt": _write(b"x"), "IMG_0001.HEIC": _write(b"x")},
        "skip",
        r"skipping 2 files that are not images.*'IMG_0001\.HEIC'.*HEIC",
        used=1,
    ),
    "RGBA": Case({"rgba.png": _mode("RGBA", "png")}, "ok"),
    "LA": Case({"la.png": _mode("LA", "png")}, "ok"),
    "P with transparency": Case({"p.gif": _mode("P", "gif")}, "ok"),
    "CMYK": Case({"cmyk.jpg": _mode("CMYK", "jpg")}, "ok"),
    "16-bit grayscale": Case({"g16.png": _mode("I;16", "png")}, "ok"),
    "grayscale": Case({"l.png": _mode("L", "png")}, "ok"),
    "EXIF-rotated photo": Case({"rotated.jpg": _exif_rotated}, "ok"),
    "animated GIF": Case({"anim.gif": _animated}, "ok"),
    "animated WebP": Case({"anim.webp": _animated}, "ok"),
    "smaller than the resolution": Case(
        {"small.png": lambda p: _photo((40, 30)).save(p)}, "warn", r"upscaled.*'small\.png' \(40x30\)"
    ),
    "legitimate 8K photo": Case({"8k.jpg": lambda p: Image.new("RGB", (7680, 4320), (90, 120, 200)).save(p)}, "ok"),
    "decompression bomb (header claims 20000 x 20000)": Case(
        {"bomb.png": lambda p: _png_header_only(p, 20000, 20000)},
        "error",
        r"bomb\.png.*20000 x 20000 pixels.*decompression bomb.*Downscale it",
        ImageTooLargeError,
    ),
    "decompression bomb beyond Pillow's own limit (40000 x 40000)": Case(
        {"bomb2.png": lambda p: _png_header_only(p, 40000, 40000)},
        "error",
        r"bomb2\.png.*decompression bomb",
        ImageTooLargeError,
    ),  # fmt: skip
    "non-ASCII file names (NFC and NFD)": Case(
        {
            "фото_猫 été.png": lambda p: _photo().save(p),
            unicodedata.normalize("NFD", "café.jpg"): lambda p: _photo().save(p),
        },
        "ok",
        used=3,
    ),  # fmt: skip
    "non-ASCII name of a broken file": Case({"сломано.jpg": _write(b"junk")}, "error", r"сломано\.jpg"),
    "symbolic link to a photo": Case({"link.png": _symlink_to_photo}, "ok"),
    "broken symbolic link": Case(
        {"gone.jpg": lambda p: p.symlink_to(p.parent / "missing.jpg")},
        "error",
        r"gone\.jpg.*symbolic link.*does not exist.*Fix the link or remove it",
        FileNotFoundError,
    ),
}


def _folder(tmp_path: Path, case: Case) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo((64, 64), seed=1).save(folder / "good.png")
    for name, write in case.files.items():
        write(folder / name)
    return folder


def _datamodule(folder: Path) -> DreamBoothDataModule:
    # No caches: these tests read the decoded pixels (and the default base model is a hub id, offline here).
    return DreamBoothDataModule(
        str(folder),
        PROMPT,
        with_prior_preservation=False,
        resolution=RES,
        batch_size=2,
        cache_latents=False,
        cache_text_embeddings=False,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_corpus_through_the_datamodule(tmp_path, caplog, name):
    case = CASES[name]
    if "WebP" in name and not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    folder = _folder(tmp_path, case)
    dm = _datamodule(folder)
    if case.outcome == "error":
        started = time.perf_counter()
        with pytest.raises(case.error, match=r"data\.instance_data_dir.*" + case.match) as err:
            dm.prepare_data()
        assert isinstance(err.value, UserInputError)  # printed as `error: ...`, without a traceback
        assert time.perf_counter() - started < 5  # refused from the header or the first bytes, not after decoding
        return
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm.prepare_data()
        dm.setup("fit")
    warnings = [r.getMessage() for r in caplog.records]
    if case.match:
        assert len(warnings) == 1 and re.search(case.match, warnings[0]), warnings
    else:
        assert not warnings
    assert len(dm.train_dataset.instance_images) == case.used
    for batch in dm.train_dataloader():
        pixels = batch["pixel_values"]
        assert pixels.shape[1:] == (3, RES, RES) and pixels.isfinite().all()
        assert pixels.min() >= -1 and pixels.max() <= 1


def test_exif_rotation_and_animation_details(tmp_path):
    _exif_rotated(tmp_path / "r.jpg")
    assert load_image(tmp_path / "r.jpg").size == (80, 120)  # displayed portrait
    _animated(tmp_path / "a.gif")
    first = np.asarray(load_image(tmp_path / "a.gif"), dtype=int)
    assert np.abs(first - np.asarray(_photo(seed=0).convert("P").convert("RGB"), dtype=int)).mean() < 30


def test_file_name_that_is_not_utf8_is_named_in_the_error(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo().save(folder / "good.png")
    bad = Path(folder, b"\xff\xfebad.jpg".decode("utf-8", "surrogateescape"))
    bad.write_bytes(b"junk")
    with pytest.raises(ImageLoadError) as err:
        _datamodule(folder).prepare_data()
    assert r"\udcff\udcfebad.jpg" in str(err.value)
    str(err.value).encode("utf-8")  # printable


@pytest.mark.parametrize(
    "instance, class_prompt, warns",
    [
        ("a photo of dog", "a photo of dog", True),
        ("a photo of a dog", "a photo of dog", True),  # "a" is in the class prompt too
        ("A Photo of Dog", "a photo of dog", True),
        ("a photo of sks dog", "a photo of dog", False),
        ("a photo of sks dog", None, False),
    ],
)
def test_instance_prompt_without_identifier_warns(tmp_path, caplog, instance, class_prompt, warns):
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        DreamBoothDataModule(
            str(tmp_path), instance, class_prompt=class_prompt, with_prior_preservation=False, num_class_images=0
        )
    assert ("has no word that data.class_prompt" in caplog.text) == warns


# ----------------------------------------------------------------------------------------------- options, via the CLI
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was reported")

    monkeypatch.setattr(lightning_modules.dreambooth, "load_components", refuse)
    monkeypatch.setattr(sd.models.loading, "load_pipeline", refuse)


OPTION_CASES = {
    "resolution not divisible by 8": (["--data.resolution=60"], ValueError, r"data\.resolution.*multiple of 8"),
    "LoRA rank 0": (["--model.lora_rank=0"], ValueError, r"model\.lora_rank must be a positive integer"),
    "LoRA rank -4": (["--model.lora_rank=-4"], ValueError, r"model\.lora_rank"),
    "unknown optimizer": (["--model.optimizer=sgd"], SystemExit, r"model\.optimizer.*sgd"),
    "unknown scheduler": (["--model.lr_scheduler=step"], SystemExit, r"model\.lr_scheduler.*step"),
    "prior preservation with num_class_images 0": (
        ["--data.num_class_images=0"],
        ValueError,
        r"data\.num_class_images must be positive with prior preservation",
    ),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_bad_option_through_the_cli(run_args, capsys, no_model_loading, name):
    overrides, error, match = OPTION_CASES[name]
    with pytest.raises(error) as err:
        cli_main(run_args(*overrides, steps=1))
    message = capsys.readouterr().err if error is SystemExit else str(err.value)
    assert error is SystemExit or isinstance(err.value, UserInputError)
    assert re.search(match, message, flags=re.S), message[-2000:]


def test_base_model_that_is_not_a_diffusers_folder(run_args, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model\.pretrained_model_name_or_path.*not a diffusers model folder") as err:
        cli_main(run_args(f"--model.pretrained_model_name_or_path={tmp_path / 'not_a_model'}", steps=1))
    assert isinstance(err.value, UserInputError)


def test_base_model_path_that_does_not_exist(run_args, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_model_name_or_path.*does not exist") as err:
        cli_main(run_args(f"--model.pretrained_model_name_or_path={tmp_path / 'nowhere'}", steps=1))
    assert isinstance(err.value, UserInputError)


def test_instance_prompt_without_identifier_warns_through_the_cli(run_args, caplog, no_model_loading):
    with (
        caplog.at_level(logging.WARNING, logger="datamodules"),
        pytest.raises(AssertionError, match="model was loaded"),
    ):
        cli_main(run_args("--data.instance_prompt=a photo of ball", steps=1))
    assert "has no word that data.class_prompt" in caplog.text
