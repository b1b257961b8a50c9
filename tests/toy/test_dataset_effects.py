"""What loss masks, per-image captions and aspect-ratio buckets change in what is learnt, on the toy world
(bench/toy_masks.py, bench/toy_captions.py, bench/toy_buckets.py, bench/toy_concepts.py): each runs demo fits of 120 steps through the CLI,
so they are marked slow
(``pytest -m slow tests/toy/test_dataset_effects.py``)."""

from __future__ import annotations

import pytest

from bench import toy_buckets, toy_concepts, toy_masks

# bench/results/cpu_toy_masks.md (seed 0, 2026-12-04): wall 0.0998 without masks, 0.0349 with; val/dino 0.279 before,
# 0.361 / 0.419 after. One seed was measured: the margins sit at about half the measured gaps.
MASK_WALL_DROP = 0.03
DINO_GAIN = 0.04


@pytest.mark.slow
def test_masks_keep_the_wall_out_of_the_subject_while_it_is_learnt():
    plain, masked = toy_masks.measure(steps=120, seeds=[0])
    assert masked["wall"] < plain["wall"] - MASK_WALL_DROP, (plain, masked)
    assert masked["dino"] > masked["dino_before"] + DINO_GAIN, masked


# bench/results/cpu_toy_buckets.md (seeds 0-2, 2026-12-04): toy DINO of renders at the wide bucket's size (40 x 24)
# against the whole subject: 0.310 / 0.274 / 0.278 with square center crops, 0.421 / 0.282 / 0.403 with buckets (seed 0:
# +0.11). At 32 x 32 renders buckets scored lower (0.262 -> 0.213 on average): no margin is asserted there.
BUCKET_GAIN = 0.05


@pytest.mark.slow
def test_buckets_learn_a_subject_near_the_edge_that_square_crops_cut_off():
    square, buckets = toy_buckets.measure(steps=120, seeds=[0])
    assert not square["buckets"] and buckets["buckets"]
    assert buckets["dino_wide"] > square["dino_wide"] + BUCKET_GAIN, (square, buckets)


# bench/results/cpu_toy_concepts.md (seeds 0-2, 200 steps, 2026-12-04): each subject's photos are closest to its own
# identifier's renders (sks photos: 0.41-0.48 for "a sks ball", 0.28-0.36 for "a zwx ball"; zwx photos: 0.29-0.30
# against 0.22-0.23; the smaller gap, about 0.07, on every seed). That "a zwx ball" is closer to its own photos than to
# the sks ones does not hold (-0.07 to +0.01), so it is not asserted.
CONCEPT_GAP = 0.03


@pytest.mark.slow
def test_each_subjects_photos_are_closest_to_its_own_identifiers_renders():
    rows = {r["prompt"]: r for r in toy_concepts.measure(steps=200, seeds=[0])}
    sks, zwx = rows["a sks ball"], rows["a zwx ball"]
    assert sks["sks"] > zwx["sks"] + CONCEPT_GAP, rows
    assert zwx["zwx"] > sks["zwx"] + CONCEPT_GAP, rows
