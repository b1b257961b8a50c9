"""Safe image listing and loading: junk is skipped, every mode becomes RGB, bad files are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    check_image_folder,
    list_images,
    load_image,
    save_image_atomic,
)

W, H = 20, 12  # non-square, so a swapped width / height shows


def _rgb(path: Path, color=(200, 30, 30), size=(W, H)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def test_extensions_cover_the_common_formats():
    for ext in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"):
        assert f".{ext}" in IMAGE_EXTENSIONS


def test_list_images_skips_hidden_junk_and_non_images(tmp_path):
    _rgb(tmp_path / "b.PNG")
    _rgb(tmp_path / "a.jpg")
    _rgb(tmp_path / "c.webp")
    for junk in (".DS_Store", "._a.jpg", ".hidden.png", "Thumbs.db", "desktop.ini", "notes.txt", "x.jpg.tmp"):
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image-like name
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    assert list_images(str(tmp_path)) == list_images(tmp_path)


def _save_mode(path: Path, mode: str) -> None:
    if mode == "RGBA":
        img = Image.new("RGBA", (W, H), (255, 0, 0, 255))
        img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    elif mode == "LA":
        img = Image.new("LA", (W, H), (50, 255))
        img.putpixel((0, 0), (0, 0))
    elif mode == "P":
        img = Image.new("P", (W, H), 1)
        img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        img.putpixel((0, 0), 0)
        img.info["transparency"] = 0  # palette index 0 is transparent -> white
    elif mode == "CMYK":
        img = Image.new("CMYK", (W, H), (0, 255, 255, 0))  # red
    elif mode == "I;16":
        arr = np.full((H, W), 65535, dtype=np.uint16)
        arr[0, 0] = 0
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    else:
        img = Image.new(mode, (W, H), 255)
        img.putpixel((0, 0), 0)
    img.save(path)


@pytest.mark.parametrize(
    "mode, ext, corner, body",
    [
        ("RGBA", "png", (255, 255, 255), (255, 0, 0)),
        ("LA", "png", (255, 255, 255), (50, 50, 50)),
        ("P", "png", (255, 255, 255), (255, 0, 0)),
        ("P", "gif", (255, 255, 255), (255, 0, 0)),
        ("CMYK", "jpg", None, (255, 0, 0)),
        ("CMYK", "tiff", None, (255, 0, 0)),
        ("I;16", "png", (0, 0, 0), (255, 255, 255)),
        ("L", "png", (0, 0, 0), (255, 255, 255)),
        ("L", "bmp", (0, 0, 0), (255, 255, 255)),
        ("1", "png", (0, 0, 0), (255, 255, 255)),
    ],
)
def test_every_mode_loads_as_rgb(tmp_path, mode, ext, corner, body):
    path = tmp_path / f"img.{ext}"
    _save_mode(path, mode)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (W, H)
    if corner is not None:
        assert img.getpixel((0, 0)) == corner
    assert np.abs(np.subtract(img.getpixel((W // 2, H // 2)), body)).max() <= 3  # JPEG is lossy


def test_16_bit_grayscale_keeps_its_tones(tmp_path):
    arr = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    img = np.asarray(load_image(tmp_path / "g.png"))
    assert img[..., 0].min() == 0 and img[..., 0].max() == 255
    assert 100 < img[H // 2, W // 2, 0] < 156  # mid-gray, not clipped to white


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(tmp_path / "anim.gif").getpixel((W // 2, H // 2)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg") as e:
        load_image(tmp_path / "cut.jpg")
    assert "remove or replace" in str(e.value)


def test_text_file_named_jpg_raises_naming_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_image(tmp_path / "notes.jpg")
    assert issubclass(ImageLoadError, ValueError)


def test_check_image_folder_missing_or_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.instance_data_dir.*nowhere"):
        check_image_folder(tmp_path / "nowhere", "data.instance_data_dir")
    _rgb(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"data\.instance_data_dir.*a\.png.*not a folder"):
        check_image_folder(tmp_path / "a.png", "data.instance_data_dir")


def test_check_image_folder_without_images_lists_the_extensions(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data\.instance_data_dir.*no image file.*\.png"):
        check_image_folder(tmp_path, "data.instance_data_dir")


def test_check_image_folder_names_the_corrupt_file(tmp_path):
    _rgb(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    _rgb(tmp_path / "c.png")
    with pytest.raises(ImageLoadError, match=r"data\.instance_data_dir.*b\.jpg"):
        check_image_folder(tmp_path, "data.instance_data_dir")
    (tmp_path / "b.jpg").unlink()
    assert [p.name for p in check_image_folder(tmp_path, "data.instance_data_dir")] == ["a.png", "c.png"]


def test_save_image_atomic_leaves_only_the_image(tmp_path):
    img = Image.new("RGB", (W, H), (1, 2, 3))
    save_image_atomic(img, tmp_path / "out.png")
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert load_image(tmp_path / "out.png").getpixel((0, 0)) == (1, 2, 3)


DREAMBENCH = Path(__file__).resolve().parents[3] / "shared" / "dreambench"


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="../shared/dreambench is not present")
def test_dreambench_photos_load():
    images = check_image_folder(DREAMBENCH / "dog", "data.instance_data_dir")
    assert len(images) >= 4 and all(load_image(p).mode == "RGB" for p in images)
