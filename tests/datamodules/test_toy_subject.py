"""The drawn toy subject is deterministic, varied, and drawable from the command line."""

from __future__ import annotations

import numpy as np
from PIL import Image

from datamodules.images import list_images
from datamodules.toy_subject import draw_toy_subject, main


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = draw_toy_subject(tmp_path / "a", num_images=3, resolution=64, seed=0)
    b = draw_toy_subject(tmp_path / "b", num_images=3, resolution=64, seed=0)
    c = draw_toy_subject(tmp_path / "c", num_images=3, resolution=64, seed=1)
    assert [p.name for p in a] == ["toy_00.png", "toy_01.png", "toy_02.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert all(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(a, c, strict=True))
    assert list_images(tmp_path / "a") == a  # nothing else left in the folder (no temporary files)


def test_images_are_varied_views_of_one_colourful_object(tmp_path):
    paths = draw_toy_subject(tmp_path, num_images=4, resolution=48, seed=0)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (48, 48, 3) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 4
    for a in arrays:  # the ball's teal, orange and yellow are all there
        r, g, b = (a[..., k].astype(int) for k in range(3))
        assert ((r < 60) & (g > 120) & (b > 120)).sum() > 10  # teal
        assert ((r > 220) & (g > 90) & (g < 150) & (b < 60)).sum() > 10  # orange
        assert ((r > 220) & (g > 200) & (b < 60)).sum() > 10  # yellow


def test_image_i_does_not_depend_on_how_many_are_drawn(tmp_path):
    few = draw_toy_subject(tmp_path / "few", num_images=2, seed=3)
    many = draw_toy_subject(tmp_path / "many", num_images=5, seed=3)
    assert few[1].read_bytes() == many[1].read_bytes()


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "toy"), "--num-images", "2", "--resolution", "32", "--seed", "0"])
    assert [p.name for p in list_images(tmp_path / "toy")] == ["toy_00.png", "toy_01.png"]
    assert Image.open(tmp_path / "toy" / "toy_00.png").size == (32, 32)
    assert "toy_01.png" in capsys.readouterr().out
