"""bench/toy_dreambench.py: its subjects are distinct and deterministic, its tables say what the runs gave, and a
reduced run goes end to end through the CLI (so the benchmark does not rot)."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest

from bench.toy_dreambench import ROWS, SUBJECTS, draw_subjects, main, table
from datamodules.toy_subject import DEMO_LOOK, draw_toy_image, draw_toy_photo_and_mask

QUICK = [  # validation and class images at a few sampler steps: the pipeline, not the quality
    "--override=--model.sampling.num_inference_steps=2",
    "--override=--data.class_images_inference_steps=2",
    "--override=--data.num_class_images=2",
    '--override=--data.validation_prompts=["a {identifier} {class_noun}"]',
]


def test_subjects_are_distinct_deterministic_and_the_first_is_the_demos(tmp_path):
    assert SUBJECTS["checker"] == DEMO_LOOK and len(SUBJECTS) >= 4
    means = {}
    for name, look in SUBJECTS.items():
        photo, mask = draw_toy_photo_and_mask(32, random.Random(7), look=look)
        again = draw_toy_image(32, random.Random(7), look)
        assert photo.tobytes() == again.tobytes()  # deterministic
        on_ball = np.asarray(mask) > 230
        means[name] = np.asarray(photo).astype(float)[on_ball].mean(axis=0)  # (3,) the ball's mean colour
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 40, (a, b, means[a], means[b])
    folders = draw_subjects(tmp_path, ["checker"])
    demo = tmp_path / "demo"
    from datamodules.toy_subject import draw_toy_subject

    draw_toy_subject(demo, 5, 32, seed=0)
    for path in sorted(demo.glob("*.png")):  # the demo subject's photos, byte for byte
        assert (folders["checker"] / path.name).read_bytes() == path.read_bytes()


def test_backgrounds_are_shared_so_only_the_ball_differs():
    plain = np.asarray(draw_toy_image(32, random.Random(1))).astype(int)
    other = np.asarray(draw_toy_image(32, random.Random(1), SUBJECTS["berry"])).astype(int)
    changed = np.abs(plain - other).sum(axis=2) > 30
    assert 0.05 < changed.mean() < 0.5 and not changed[0].any()


def test_table_pairs_each_recipe_with_lora_and_marks_consistent_differences():
    results = [{"row": "ceiling", "subject": s, "seed": None, "dino": 0.7, "clip_i": 0.9, "div": 0.3} for s in "ab"]
    for subject, seed, base in [("a", 0, 0.1), ("a", 1, 0.2), ("b", 0, 0.3), ("b", 1, 0.5)]:
        metrics = dict(dino=base, clip_i=base, clip_t=0.0, pres=0.0, div=0.4)
        results.append({"row": "base", "subject": subject, "seed": seed, **metrics, "dino": 0.0})
        results.append({"row": "lora", "subject": subject, "seed": seed, "seconds": 10, **metrics})
        noisy = {**metrics, "dino": base + 0.05, "clip_i": base + (0.1 if seed else -0.1)}
        results.append({"row": "dora", "subject": subject, "seed": seed, "seconds": 12, **noisy})
    lines = table(results)
    dora = next(line for line in lines if line.startswith("| dora | 4 | +"))
    cells = dora.split(" | ")
    assert cells[2] == "+0.050 ± 0.000 * (4/4)"  # DINO: the same gain on every pair
    assert cells[3] == "+0.000 ± 0.115 (2/4)"  # CLIP-I: signs differ, no effect
    assert any(line.startswith("| ceiling | 2 | 0.700 ± 0.000 | 0.900 ± 0.000 | n/a | n/a | 0.300") for line in lines)


def test_reduced_run_goes_end_to_end(tmp_path):
    out = tmp_path / "dreambench.md"
    raw = tmp_path / "raw.jsonl"
    results = main(["--steps", "2", "--seeds", "0", "--subjects", "bee", "--rows", "lora", *QUICK,
                    "--out", str(out), "--raw", str(raw)])  # fmt: skip
    assert [r["row"] for r in results] == ["ceiling", "base", "lora"]
    assert len(raw.read_text().splitlines()) == 3
    for r in results[1:]:
        assert all(np.isfinite(r[m]) for m in ("dino", "clip_i", "clip_t", "pres", "div"))
    text = out.read_text()
    assert "| lora | 1 | " in text and "| base | 1 | " in text and "Command: `OMP_NUM_THREADS=1" in text
    assert set(ROWS) >= {"lora", "full", "dora", "loha 4x", "new_tokens"}


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None, reason="prodigyopt is installed here")
def test_prodigy_row_without_its_package_stops_before_any_fit(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--rows", "lora", "prodigy"])
    assert stop.value.code == 2 and "pip install prodigyopt" in capsys.readouterr().err


def test_the_4x_rows_follow_the_demos_rates():
    from bench.common import demo_config
    from bench.toy_adapters import FAST

    model = demo_config()["model"]
    rates = {a.split("=")[0]: float(a.split("=")[1]) for a in ROWS["loha 4x"] if "_lr" in a or "learning_rate" in a}
    assert rates == pytest.approx(
        {
            "--model.learning_rate": 4 * float(model["learning_rate"]),
            "--model.text_encoder_lr": 4 * float(model["text_encoder_lr"]),
        }
    )
    assert tuple(FAST) == tuple(a for a in ROWS["lokr 4x"] if a.startswith("--model.") and "adapter" not in a)
    lion = {a.split("=")[0]: float(a.split("=")[1]) for a in ROWS["lion"] if "_lr" in a or "learning_rate" in a}
    assert lion["--model.learning_rate"] == pytest.approx(float(model["learning_rate"]) / 3, rel=1e-3)
