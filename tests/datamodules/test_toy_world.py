from __future__ import annotations

import numpy as np

from datamodules.toy_world import CLASSES, COLOURS, world_arrays, world_item


def test_the_world_is_deterministic_and_varied():
    a, captions_a, _ = world_arrays(seed=3, count=40)
    b, captions_b, _ = world_arrays(seed=3, count=40)
    assert np.array_equal(a, b) and captions_a == captions_b
    other, _, _ = world_arrays(seed=4, count=40)
    assert not np.array_equal(a, other)
    assert a.shape == (40, 32, 32, 3) and len(set(captions_a)) > 20


def test_captions_name_what_the_image_shows():
    for i in range(200):
        image, caption, scene = world_item(seed=0, index=i)
        assert caption.startswith("a ") and f"{scene.colour} {scene.cls}" in caption
        assert (scene.size in caption.split()) == scene.keep[0]
        assert (scene.position in caption) == scene.keep[1]
        assert (f"{scene.wall_pattern} {scene.wall} wall" in caption) == scene.keep[2]
        # The object's colour is in the picture: its pixels come close to it.
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        assert np.abs(pixels - np.array(COLOURS[scene.colour])).sum(1).min() < 60, caption


def test_the_demo_subjects_look_is_never_in_the_world():
    # The subject is a teal-and-orange checkered ball: no world colour or caption word names teal, orange or a pattern.
    words = {w for i in range(500) for w in world_item(seed=0, index=i)[1].replace(",", "").split()}
    assert not words & {"teal", "orange", "checkered", "checker", "pattern", "sks"}
    assert "ball" in CLASSES and not {"teal", "orange"} & set(COLOURS)
