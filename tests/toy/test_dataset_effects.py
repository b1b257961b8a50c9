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


# bench/results/cpu_toy_concepts.md (seeds 0-2, 200 steps, LoRA rank 16, 2026-12-04): each subject's photos are closest
# to its own identifier's renders (sks photos: 0.40-0.51 for "a sks ball", 0.23-0.33 for "a zwx ball"; zwx photos:
# 0.28-0.37 against 0.04-0.27; seed 0: gaps 0.15 and 0.24), and each identifier's renders are closer to its own photos
# than to the other's (seed 0: +0.37 for sks, +0.023 for zwx; seeds 1-2: +0.04 to +0.24). At rank 4 the second did not
# hold (bench/results/cpu_toy_concepts_variants.md). The margins sit at about half of seed 0's gaps.
CONCEPT_GAP = 0.07
OWN_PHOTOS_GAP = 0.01


@pytest.mark.slow
def test_each_identifier_renders_its_own_subject():
    rows = {r["prompt"]: r for r in toy_concepts.measure(steps=200, seeds=[0])}
    sks, zwx = rows["a sks ball"], rows["a zwx ball"]
    assert sks["sks"] > zwx["sks"] + CONCEPT_GAP, rows  # each subject's photos: closest to its own identifier's renders
    assert zwx["other"] > sks["other"] + CONCEPT_GAP, rows
    assert sks["sks"] > sks["other"] + OWN_PHOTOS_GAP, rows  # each identifier's renders: closest to its own photos
    assert zwx["other"] > zwx["sks"] + OWN_PHOTOS_GAP, rows
