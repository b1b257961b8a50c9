"""What loss masks, per-image captions, aspect-ratio buckets and two concepts change in what is learnt, on the toy world
(bench/toy_masks.py, bench/toy_captions.py, bench/toy_buckets.py, bench/toy_concepts.py): each runs demo fits of 120,
200 or 360 steps through the CLI, so they are marked slow (``pytest -m slow tests/toy/test_dataset_effects.py``)."""

from __future__ import annotations

import pytest

from bench import toy_buckets, toy_captions, toy_concepts, toy_masks
from bench.common import demo_steps

# bench/results/cpu_toy_masks.md (seeds 0-2, 120 steps, the demo recipe and subject of issue 15, 2026-12-04), the
# subject photographed on one plain light blue wall. The wall in 16 renders of "a sks ball" (toy CLIP, that wall minus
# the nine other walls), without / with masks: 0.143 / -0.155, 0.470 / -0.209, 0.563 / -0.255 (drops 0.30, 0.68, 0.82;
# the base model's -0.028). val/dino -0.082 before; with masks 0.549 / 0.434 / 0.466 after (gains 0.63, 0.52, 0.55).
# The margins sit at about half of the smallest. On the striped pink wall used before, a wall the base model draws
# itself for "a sks ball", no drop showed (cpu_toy_masks_striped.md).
MASK_WALL_DROP = 0.15
DINO_GAIN = 0.25


@pytest.fixture(scope="module")
def mask_runs():
    return toy_masks.measure(steps=120, seeds=[0])


@pytest.mark.slow
def test_masks_keep_the_wall_out_while_the_subject_is_learnt(mask_runs):
    plain, masked = mask_runs
    assert masked["wall"] < plain["wall"] - MASK_WALL_DROP, (plain, masked)
    assert masked["dino"] > masked["dino_before"] + DINO_GAIN, masked


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
# 2026-12-04), toy DINO of each identifier's renders against its own photos minus against the other's: "a sks ball"
# +0.122, +0.122, +0.203; "a ohwx ball" +0.109, +0.189, +0.063 (issue 14's criterion; margins at about half of the
# smallest). With "zwx" (two CLIP tokens) as the second identifier its renders looked like the sks subject on seeds 1-2
# (cpu_toy_concepts_zwx.md). The photos' side, each subject's photos closest to its own identifier's renders, does not
# hold for the ohwx photos on seeds 0-1 (the sks renders score 0.52 / 0.41 against them, the ohwx renders 0.33 / 0.30):
# a strict xfail, so it reports when it holds.
FIRST_OWN_GAP = 0.06
SECOND_OWN_GAP = 0.03
SEPARATION = 0.01
CONCEPT_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def concept_runs():
    """Per seed, the rows of "a sks ball" and of the second identifier's prompt."""
    rows = toy_concepts.measure(steps=200, seeds=list(CONCEPT_SEEDS))
    by_prompt = {(r["seed"], r["prompt"]): r for r in rows}
    second = f"a {toy_concepts.NAMES[1]} ball"
    return {seed: (by_prompt[seed, "a sks ball"], by_prompt[seed, second]) for seed in CONCEPT_SEEDS}


@pytest.mark.slow
def test_each_identifier_renders_its_own_subject(concept_runs):
    for seed, (first, other) in concept_runs.items():
        assert first["sks"] > first["other"] + FIRST_OWN_GAP, (seed, first, other)
        assert other["other"] > other["sks"] + SECOND_OWN_GAP, (seed, first, other)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not shown on the issue-15 subject and demo recipe: the sks renders score higher against the ohwx photos "
    "than the ohwx renders do on seeds 0-1 (bench/results/cpu_toy_concepts.md)",
)
def test_each_subjects_photos_are_closest_to_its_own_identifiers_renders(concept_runs):
    for seed, (first, other) in concept_runs.items():
        assert first["sks"] > other["sks"] + SEPARATION, (seed, first, other)
        assert other["other"] > first["other"] + SEPARATION, (seed, first, other)


# bench/results/cpu_toy_captions.md (seeds 0-4, the demo's 360 steps, recipe and subject, 2026-12-04), the subject
# photographed on the plain light blue wall of the masks test, each photo captioned "a {identifier} ball, plain light
# blue wall" or trained on the instance prompt. How much "a sks ball, plain <colour> wall" sets the wall for the four
# colours no photo is on (toy CLIP, 16 renders a colour), instance prompt / captions: -0.027 / 0.189, 0.016 / 0.271,
# 0.105 / 0.316, 0.180 / 0.384, 0.123 / 0.382 (gaps 0.22, 0.25, 0.21, 0.20, 0.26); val/dino -0.082 before, 0.34-0.58
# after with captions. The margin sits at about half of the smallest gap. With the photos on two or five walls the gap
# was smaller and not clear on every seed (cpu_toy_captions_two_walls.md: -0.022 to +0.250; _five_walls.md: +0.021 to
# +0.116).
CAPTION_CONTROL_GAIN = 0.10


@pytest.mark.slow
def test_captions_naming_the_wall_let_the_prompt_set_another_wall():
    plain, captioned = toy_captions.measure(steps=demo_steps(), seeds=[0], base=False)
    assert not plain["captions"] and captioned["captions"]
    assert captioned["control_other"] > plain["control_other"] + CAPTION_CONTROL_GAIN, (plain, captioned)
    assert captioned["dino"] > captioned["dino_before"] + DINO_GAIN, captioned
