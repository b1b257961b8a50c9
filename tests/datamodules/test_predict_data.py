"""``predict`` data: the prompts file and the ControlNet condition image."""

from __future__ import annotations

import pytest

from datamodules.images import ImageLoadError
from datamodules.predict import load_control_image, read_prompts_file


def test_prompts_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n a dog \n\nthe {identifier} {class_noun}\n")
    assert read_prompts_file(path) == ["a dog", "the {identifier} {class_noun}"]
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts_file(path)


def test_control_image(tmp_path, toy_subject_dir):
    image = load_control_image(next(toy_subject_dir.glob("*.png")))
    assert image.shape == (1, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ImageLoadError, match=r"data\.control_image.*bad\.jpg"):
        load_control_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError, match=r"data\.control_image"):
        load_control_image(tmp_path / "missing.png")
