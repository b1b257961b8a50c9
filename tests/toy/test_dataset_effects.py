"""What loss masks, per-image captions and aspect-ratio buckets change in what is learnt, on the toy world
(bench/toy_masks.py, bench/toy_captions.py, bench/toy_buckets.py, bench/toy_concepts.py): each runs demo fits of 120 or
200 steps through the CLI, so they are marked slow (``pytest -m slow tests/toy/test_dataset_effects.py``)."""

from __future__ import annotations

import pytest

from bench import toy_buckets, toy_concepts, toy_masks

# bench/results/cpu_toy_masks.md (seeds 0-2, 120 steps, the demo recipe and subject of issue 15, 2026-12-04): val/dino
# 0.208 before; with masks 0.722 / 0.457 / 0.670 after (gains 0.51, 0.25, 0.46). The margin sits at about half of the
# smallest gain.
DINO_GAIN = 0.12
# The wall the masks should keep out: toy CLIP "striped pink wall" minus "plain pink wall" of 8 renders of "a sks ball",
# without / with masks: seed 0 -0.027 / -0.047, seed 1 0.261 / 0.232, seed 2 0.239 / 0.275 (drops 0.019, 0.029,
# -0.036); at the demo's 360 steps (bench/results/cpu_toy_masks_360steps.md) the masked renders carried more wall on
# every seed (0.29-0.35 against -0.08-0.25). The drop measured with the old subject and recipe (0.0998 -> 0.0349, one
# seed: this margin) no longer shows, nor with 32 renders instead of 8 (cpu_toy_masks_32renders.md: drops -0.016,
# -0.023, 0.030), so that test is a strict xfail: it reports when the drop comes back.
MASK_WALL_DROP = 0.03


@pytest.fixture(scope="module")
def mask_runs():
    return toy_masks.measure(steps=120, seeds=[0])


@pytest.mark.slow
def test_masks_still_learn_the_subject(mask_runs):
    plain, masked = mask_runs
    assert masked["dino"] > masked["dino_before"] + DINO_GAIN, masked


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not shown on the issue-15 subject and demo recipe: drops 0.019 / 0.029 / -0.036 over seeds 0-2 at 120 "
    "steps, the masked renders carried more wall at 360 (bench/results/cpu_toy_masks*.md)",
)
def test_masks_keep_the_wall_out_of_the_subject(mask_runs):
    plain, masked = mask_runs
    assert masked["wall"] < plain["wall"] - MASK_WALL_DROP, (plain, masked)


# bench/results/cpu_toy_buckets.md (seeds 0-2, 120 steps, the demo recipe and subject of issue 15, 2026-12-04): toy DINO
# of "a sks ball" renders against the whole subject, square center crops / buckets: at the wide bucket's size (40 x 24)
# 0.002 / 0.627, 0.110 / 0.282, 0.330 / 0.518 (gains 0.63, 0.17, 0.19); at 32 x 32 0.208 / 0.531, 0.034 / 0.267,
# 0.296 / 0.446 (gains 0.32, 0.23, 0.15). The margins sit at about half of the smallest gains.
BUCKET_GAIN = 0.08
BUCKET_GAIN_SQUARE = 0.07


@pytest.mark.slow
def test_buckets_learn_a_subject_near_the_edge_that_square_crops_cut_off():
    square, buckets = toy_buckets.measure(steps=120, seeds=[0])
    assert not square["buckets"] and buckets["buckets"]
    assert buckets["dino_wide"] > square["dino_wide"] + BUCKET_GAIN, (square, buckets)
    assert buckets["dino"] > square["dino"] + BUCKET_GAIN_SQUARE, (square, buckets)


# bench/results/cpu_toy_concepts.md (seeds 0-2, 200 steps, the demo recipe (LoRA rank 16, 3e-3) and subject of issue 15,
# 2026-12-04): "a sks ball" renders are closer to the sks photos than to the zwx ones on every seed (+0.134, +0.138,
# +0.220: FIRST_OWN_GAP at about half of the smallest), but "a zwx ball" renders only on seed 0 (+0.039; seeds 1-2:
# -0.169, -0.153), and each subject's photos are closest to its own identifier's renders on seeds 0 and 2 only (sks
# photos +0.070, -0.013, +0.059; zwx photos +0.103, -0.018, +0.008). At 360 steps (cpu_toy_concepts_360steps.md) the
# zwx renders were closer to the sks photos on seeds 1-2 too (-0.080, -0.027); with 32 renders a prompt instead of 8
# (cpu_toy_concepts_32renders.md) on every seed (-0.007, -0.210, -0.175). With the subject and recipe before
# issue 15 (rank 16 at 1e-3) all four held on seeds 0-2 (smallest gaps: +0.023 for the zwx renders, +0.039 for the zwx
# photos), so their test is a strict xfail over seeds 0-2 at SEPARATION: it reports when the second identifier separates
# again.
FIRST_OWN_GAP = 0.07
SEPARATION = 0.01
CONCEPT_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def concept_runs():
    rows = toy_concepts.measure(steps=200, seeds=list(CONCEPT_SEEDS))
    return {seed: {r["prompt"]: r for r in rows if r["seed"] == seed} for seed in CONCEPT_SEEDS}


@pytest.mark.slow
def test_the_first_identifier_renders_its_own_subject(concept_runs):
    for seed, rows in concept_runs.items():
        sks = rows["a sks ball"]
        assert sks["sks"] > sks["other"] + FIRST_OWN_GAP, (seed, rows)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not shown on the issue-15 subject and demo recipe: the zwx renders were closer to the sks photos on seeds "
    "1-2 (bench/results/cpu_toy_concepts*.md)",
)
def test_each_identifier_renders_its_own_subject(concept_runs):
    for seed, rows in concept_runs.items():
        sks, zwx = rows["a sks ball"], rows["a zwx ball"]
        # each subject's photos: closest to its own identifier's renders
        assert sks["sks"] > zwx["sks"] + SEPARATION, (seed, rows)
        assert zwx["other"] > sks["other"] + SEPARATION, (seed, rows)
        # each identifier's renders: closest to its own photos
        assert sks["sks"] > sks["other"] + SEPARATION, (seed, rows)
        assert zwx["other"] > zwx["sks"] + SEPARATION, (seed, rows)


# bench/toy_captions.py has no test here: per-photo captions naming the wall gave more wall control than the instance
# prompt on average but not on every seed (bench/results/cpu_toy_captions.md, 120 steps: -0.001 to +0.199 over seeds
# 0-2; cpu_toy_captions_360steps.md, 360 steps: +0.005 to +0.060), so no margin is asserted.
