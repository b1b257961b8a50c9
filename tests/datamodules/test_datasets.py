"""DreamBoothDataset transforms and pairing, and the collate function that makes the batch contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.datasets import DreamBoothDataset, collate_dreambooth

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _solid(path: Path, color, size=(40, 24)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _stripes(path: Path, colors, width_each=32, height=32) -> Path:
    img = Image.new("RGB", (width_each * len(colors), height))
    for k, c in enumerate(colors):
        img.paste(c, (k * width_each, 0, (k + 1) * width_each, height))
    img.save(path)
    return path


def _color(pixels: torch.Tensor) -> tuple[int, ...]:
    """The mean colour of a [-1, 1] image tensor, as 0-255 RGB."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def test_shapes_and_range_for_any_input_size(tmp_path):
    paths = [_solid(tmp_path / "wide.png", RED, (100, 60)), _solid(tmp_path / "small.png", GREEN, (10, 20))]
    ds = DreamBoothDataset(paths, "a photo of sks ball", 32)
    assert len(ds) == 2
    for i in range(2):
        pixels, prompt = ds[i]["instance"]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        assert prompt == "a photo of sks ball"
        assert "class" not in ds[i]
    assert _color(ds[0]["instance"][0]) == RED
    white = DreamBoothDataset([_solid(tmp_path / "w.png", (255, 255, 255))], "p", 16)[0]["instance"][0]
    black = DreamBoothDataset([_solid(tmp_path / "k.png", (0, 0, 0))], "p", 16)[0]["instance"][0]
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))
    with pytest.raises(IndexError):
        ds[2]


def test_center_crop_takes_the_middle(tmp_path):
    path = _stripes(tmp_path / "rgb.png", [RED, GREEN, BLUE])  # 96 x 32: the middle third is green
    pixels = DreamBoothDataset([path], "p", 32, center_crop=True)[0]["instance"][0]
    assert _color(pixels) == GREEN


def test_random_crop_moves(tmp_path):
    path = _stripes(tmp_path / "rgb.png", [RED, GREEN, BLUE])
    ds = DreamBoothDataset([path], "p", 32, center_crop=False)
    torch.manual_seed(0)
    crops = {_color(ds[0]["instance"][0]) for _ in range(20)}
    assert len(crops) > 3  # different windows of the stripes, not one fixed crop


def test_random_flip_flips_about_half_the_time(tmp_path):
    path = _stripes(tmp_path / "kw.png", [(0, 0, 0), (255, 255, 255)], width_each=8, height=16)  # black | white
    torch.manual_seed(0)
    flipped = DreamBoothDataset([path], "p", 16, random_flip=True)
    lefts = [flipped[0]["instance"][0][0, 8, 0].item() for _ in range(40)]
    assert 5 < sum(v > 0 for v in lefts) < 35  # left column white in some draws, black in others
    plain = DreamBoothDataset([path], "p", 16, random_flip=False)
    assert all(plain[0]["instance"][0][0, 8, 0].item() == -1 for _ in range(5))


def test_class_images_are_cycled_alongside_instance_images(tmp_path):
    inst = [_solid(tmp_path / f"i{k}.png", c) for k, c in enumerate([RED, GREEN, BLUE])]
    cls = [_solid(tmp_path / f"c{k}.png", (k * 50, k * 50, k * 50)) for k in range(5)]
    ds = DreamBoothDataset(inst, "a photo of sks dog", 16, class_images=cls, class_prompt="a photo of dog")
    assert len(ds) == 5
    item = ds[4]
    assert _color(item["instance"][0]) == GREEN and item["instance"][1] == "a photo of sks dog"  # 4 % 3 == 1
    assert _color(item["class"][0]) == (200, 200, 200) and item["class"][1] == "a photo of dog"
    assert len(DreamBoothDataset(cls, "p", 16, class_images=inst, class_prompt="q")) == 5


def test_dataset_option_errors(tmp_path):
    path = _solid(tmp_path / "a.png", RED)
    with pytest.raises(ValueError, match="class_prompt"):
        DreamBoothDataset([path], "p", 16, class_images=[path])
    with pytest.raises(ValueError, match="no instance images"):
        DreamBoothDataset([], "p", 16)
    with pytest.raises(ValueError, match="empty"):
        DreamBoothDataset([path], "p", 16, class_images=[], class_prompt="q")


def test_collate_puts_a_prior_mask_on_the_class_rows(tmp_path):
    inst = [_solid(tmp_path / f"i{k}.png", c) for k, c in enumerate([RED, GREEN, BLUE])]
    cls = [_solid(tmp_path / "c.png", (0, 0, 0))]
    ds = DreamBoothDataset(inst, "a photo of sks dog", 16, class_images=cls, class_prompt="a photo of dog")
    batch = collate_dreambooth([ds[0], ds[1], ds[2]])
    assert set(batch) == {"pixel_values", "prompts", "is_prior", "original_sizes", "crop_top_lefts"}
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["is_prior"].dtype == torch.bool
    assert batch["is_prior"].tolist() == [False, False, False, True, True, True]
    assert batch["prompts"] == ["a photo of sks dog"] * 3 + ["a photo of dog"] * 3
    for row, prompt, prior in zip(batch["pixel_values"], batch["prompts"], batch["is_prior"], strict=True):
        assert (_color(row) == (0, 0, 0)) == bool(prior) == (prompt == "a photo of dog")
    assert [_color(r) for r in batch["pixel_values"][:3]] == [RED, GREEN, BLUE]


def test_collate_without_class_images_has_no_prior_rows(tmp_path):
    ds = DreamBoothDataset([_solid(tmp_path / "a.png", RED)], "p", 16)
    batch = collate_dreambooth([ds[0], ds[0]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["is_prior"].tolist() == [False, False] and batch["prompts"] == ["p", "p"]


def test_size_and_crop_of_each_row_leave_the_random_draws_as_they_were(tmp_path):
    """Each row's ``original_sizes`` / ``crop_top_lefts`` (SDXL's size conditioning) are read without drawing: the
    pixels under a random crop and flip are those of the plain transform from the same seed, and the recorded crop is
    where those pixels were cut from the resized photo."""
    import numpy as np
    import torch
    from PIL import Image

    from datamodules.datasets import DreamBoothDataset, collate_dreambooth, image_transform

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    ds = DreamBoothDataset([tmp_path / "wide.png"], "a sks x", 32, center_crop=False, random_flip=False)
    torch.manual_seed(3)
    batch = collate_dreambooth([ds[0], ds[0]])
    torch.manual_seed(3)
    plain = image_transform(32, center_crop=False)
    image = Image.open(tmp_path / "wide.png").convert("RGB")
    expected = torch.stack([plain(image), plain(image)])
    assert torch.equal(batch["pixel_values"], expected)  # the same draws as before the sizes were recorded
    assert batch["original_sizes"].tolist() == [[40, 70], [40, 70]]
    resized = plain.transforms[0](image)  # 56 x 32 (w x h)
    for row, (top, left) in enumerate(batch["crop_top_lefts"].tolist()):
        crop = resized.crop((left, top, left + 32, top + 32))
        assert torch.equal(plain.transforms[3](plain.transforms[2](crop)), batch["pixel_values"][row])
    assert batch["crop_top_lefts"][:, 0].eq(0).all() and batch["crop_top_lefts"][:, 1].le(56 - 32).all()
