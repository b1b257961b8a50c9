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


def test_world_2_patterns_are_drawn_never_captioned_and_leave_world_1_as_it_was():
    plain, captions, scenes = world_arrays(seed=0, count=120)
    patterned, captions_2, scenes_2 = world_arrays(seed=0, count=120, pattern_prob=0.5)
    assert captions_2 == captions  # the captioned draws come first: a pattern changes no caption
    with_pattern = [i for i, s in enumerate(scenes_2) if s.pattern != "plain"]
    assert 30 < len(with_pattern) < 90 and {scenes_2[i].pattern for i in with_pattern} == {"checker", "stripes", "dots"}
    for i, (a, b) in enumerate(zip(plain, patterned, strict=True)):
        assert np.array_equal(a, b) == (i not in with_pattern)  # world 1 item for item where there is no pattern
    for i in with_pattern:  # the second colour is a world colour other than the object's...
        assert scenes_2[i].second in COLOURS.values() and scenes_2[i].second != COLOURS[scenes_2[i].colour]
    large = [i for i in with_pattern if scenes_2[i].size == "large" and scenes_2[i].cls != "ring"]
    assert len(large) > 5
    for i in large:  # ...and on a large object it is in the picture (on small ones the cells blur at 32 px)
        second = np.array(scenes_2[i].second)
        assert np.abs(patterned[i].reshape(-1, 3).astype(int) - second).sum(1).min() < 60, captions_2[i]
    assert all(s.rgb is None and s.emblem == "none" for s in scenes_2)


def test_free_colour_images_for_the_vae_have_any_colours_patterns_and_emblems():
    images, _, scenes = world_arrays(seed=1, count=80, free_colours=True)
    assert len({s.rgb for s in scenes}) == 80 and {s.emblem for s in scenes} == {"none", "star", "dot"}
    assert {s.pattern for s in scenes} == {"plain", "checker", "stripes", "dots"}
    again, _, _ = world_arrays(seed=1, count=80, free_colours=True, processes=2)  # the same, drawn by 2 processes
    assert np.array_equal(images, again)
