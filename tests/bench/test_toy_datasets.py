"""The toy data of bench/toy_masks.py, bench/toy_captions.py, bench/toy_buckets.py and bench/toy_concepts.py: what
their measurements rest on."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from bench.toy_buckets import draw_wide_subject
from bench.toy_captions import COLOURS, summary
from bench.toy_concepts import NAMES, draw_two_subjects
from bench.toy_masks import draw_subject_on_walls
from datamodules.images import list_images
from datamodules.toy_subject import ORANGE, TEAL, YELLOW, draw_toy_image, draw_toy_photo_and_mask
from datamodules.toy_world import WALLS


def test_plain_drawing_is_unchanged_and_the_mask_covers_the_ball():
    photo, mask = draw_toy_photo_and_mask(32, random.Random(3))
    assert photo.tobytes() == draw_toy_image(32, random.Random(3)).tobytes()
    m = np.asarray(mask) / 255.0
    assert 0.05 < m.mean() < 0.5  # the ball, not the picture
    teal = np.asarray(photo)[m > 0.9]  # on the ball: its teal and orange checks, not the wall
    assert (np.abs(teal.astype(int) - (0, 150, 150)).sum(axis=1) < 60).mean() > 0.2


def test_one_wall_photos_have_masks_and_the_plain_light_blue_wall(tmp_path):
    draw_subject_on_walls(tmp_path / "masked", masks=True)
    photos = list_images(tmp_path / "masked")
    assert len(photos) == 5 and all(p.with_name(f"{p.stem}_mask.png").is_file() for p in photos)
    for photo in photos:
        top_row = np.asarray(Image.open(photo))[0].astype(int)  # (W, 3): the wall above the ball
        assert (np.abs(top_row - WALLS["light blue"]).sum(axis=1) < 20).all()
    draw_subject_on_walls(tmp_path / "plain", masks=False)
    assert not list((tmp_path / "plain").glob("*_mask.png")) and not list((tmp_path / "plain").glob("*.txt"))


def test_captioned_photos_name_their_own_wall(tmp_path):
    draw_subject_on_walls(tmp_path / "one", captions=True)
    captions = {p.read_text(encoding="utf-8").strip() for p in (tmp_path / "one").glob("*.txt")}
    assert captions == {"a {identifier} ball, plain light blue wall"} and len(list_images(tmp_path / "one")) == 5
    draw_subject_on_walls(tmp_path / "two", captions=True, walls=("light blue", "gray"))
    for photo in list_images(tmp_path / "two"):
        wall = next(c for c, rgb in WALLS.items() if tuple(np.asarray(Image.open(photo))[0, 0]) == rgb)
        assert photo.with_suffix(".txt").read_text(encoding="utf-8") == f"a {{identifier}} ball, plain {wall} wall\n"
        assert wall == ("light blue", "gray")[int(photo.stem[-2:]) % 2]


def test_wall_control_summary_leaves_out_the_photos_walls():
    control = {"white": 0.1, "gray": 0.2, "pink": 0.3, "light blue": 0.9, "beige": 0.5}
    assert summary(control, ("light blue",)) == pytest.approx({"control_other": 0.275, "control_all": 0.4})
    assert summary(control, COLOURS)["control_other"] is None


def test_wide_photos_have_the_ball_near_an_edge_where_a_square_crop_cuts_it_off(tmp_path):
    draw_wide_subject(tmp_path / "wide", tmp_path / "squares")
    for photo in list_images(tmp_path / "wide"):
        pixels = np.asarray(Image.open(photo).convert("RGB")).astype(int)
        assert pixels.shape == (48, 80, 3)
        ball = sum(np.abs(pixels - colour).sum(axis=2) < 60 for colour in (TEAL, ORANGE, YELLOW))  # (48, 80)
        per_column = ball.sum(axis=0)  # (80,) the ball's pixels (checks and star) per column
        assert per_column[16:64].sum() < 0.35 * per_column.sum()  # the square crop (x 16-64 of 80) keeps under 35%


def test_two_subjects_differ_only_on_the_ball(tmp_path):
    folders = draw_two_subjects(tmp_path)
    a, b = (np.asarray(Image.open(folders[n] / "toy_00.png")).astype(int) for n in NAMES)
    changed = np.abs(a - b).sum(axis=2) > 30
    assert 0.05 < changed.mean() < 0.5 and not changed[0].any()  # the ball; the wall's top row untouched


def test_the_second_subject_can_take_a_toy_dreambench_look(tmp_path):
    folders = draw_two_subjects(tmp_path, names=("sks", "ohwx"), look="bee")
    a, b = (np.asarray(Image.open(folders[n] / "toy_00.png")).astype(int) for n in ("sks", "ohwx"))
    changed = np.abs(a - b).sum(axis=2) > 30
    assert 0.05 < changed.mean() < 0.5 and not changed[0].any()  # another ball where the demo's is; the same wall
