"""``train.py test``: the DreamBench protocol on a DreamBench-layout folder of toy subjects, and on the run's subject."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from callbacks.pictures import read_layout
from callbacks.run_dir import run_dir
from datamodules.toy_subject import draw_toy_subject
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]
TABLE = """Classes

subject_name,class
red_ball,ball
blue_dog,dog
not_copied,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]
"""


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """Two generated toy subjects in the DreamBench layout; the table names a third that has no folder."""
    root = tmp_path_factory.mktemp("bench")
    draw_toy_subject(root / "red_ball", num_images=3, resolution=64, seed=1)
    draw_toy_subject(root / "blue_dog", num_images=2, resolution=64, seed=2)
    (root / "prompts_and_classes.txt").write_text(TABLE)
    return root


def _test_args(tmp_path: Path, toy_subject_dir: Path, *overrides: str) -> list[str]:
    return [
        "test",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar=false",
        "--data.instance_data_dir", str(toy_subject_dir),
        "--data.class_data_dir", str(tmp_path / "no_class_images_needed"),
        "--model.sampling.num_inference_steps=3",
        "--data.eval_num_images=2",
        *overrides,
    ]  # fmt: skip


def test_dreambench_folder_gives_a_complete_report(bench_dir, lora_export, tmp_path, toy_subject_dir):
    args = [f"--data.eval_data_dir={bench_dir}", "--data.eval_num_prompts=1", "--data.validation_batch_size=3"]
    cli = cli_main(_test_args(tmp_path, toy_subject_dir, *args, f"--model.lora_weights={lora_export / 'export'}"))
    folder = run_dir(cli.trainer) / "eval"
    report = json.loads((folder / "report.json").read_text())
    metrics = ("dino", "clip_i", "clip_t", "pres", "div")
    assert list(report["subjects"]) == ["red_ball", "blue_dog"]  # table order; not_copied has no folder
    for name, live, references in (("red_ball", False, 3), ("blue_dog", True, 2)):
        subject = report["subjects"][name]
        assert subject["live"] is live and subject["references"] == references
        assert subject["images"] == 1 * 2 and subject["prompts"] == 1
        assert all(math.isfinite(subject[m]) for m in metrics), subject
    for m in metrics:
        assert report["mean"][m] == pytest.approx(
            (report["subjects"]["red_ball"][m] + report["subjects"]["blue_dog"][m]) / 2
        )
    assert report["encoders"] == {
        "dino": "builtin:tiny-dino",
        "clip": "builtin:tiny-clip",
        "div_distance": "1-cos:builtin:tiny-dino",
    }
    assert report["model"]["sampler"] == "dpm++" and report["model"]["num_inference_steps"] == 3
    assert report["model"]["lora_weights"] == str(lora_export / "export")
    assert report["prompts"]["images_per_prompt"] == 2
    with open(folder / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["red_ball", "blue_dog", "mean"]
    with open(folder / "images.csv") as f:
        images = list(csv.DictReader(f))
    assert len(images) == 2 * (1 + 1) * 2  # subjects x (prompts + the class prompt) x images
    # The live list (built in: this table has none) for a dog, the table's object list for a ball.
    assert {r["prompt"] for r in images if r["subject"] == "blue_dog"} == {"a sks dog in the jungle", "a dog"}
    assert {r["prompt"] for r in images if r["subject"] == "red_ball"} == {"a sks ball in the jungle", "a ball"}
    assert sorted(p.name for p in (folder / "grids").glob("*.png")) == ["blue_dog.png", "red_ball.png"]
    # Each subject's grid opens with its photos as trained, then its renders, 64 px enlarged to 256 px and captioned.
    layout = read_layout(folder / "grids" / "red_ball.png")
    reference, *renders = layout["rows"]
    assert reference["kind"] == "reference" and reference["label"].startswith("the subject: 3 photos as trained (64 px")
    assert [c["caption"] for c in reference["cells"]] == [[p.name] for p in sorted((bench_dir / "red_ball").iterdir())]
    assert [r["label"] for r in renders] == ["a sks ball in the jungle", "a ball (the class prompt)"]
    assert all(c["box"][2] - c["box"][0] == 256 for r in layout["rows"] for c in r["cells"])
    assert renders[0]["cells"][0]["caption"][0].startswith("seed 0, dino ")
    assert renders[1]["cells"][0]["caption"][0].startswith("seed 1000, pres ")
    assert layout["title"][0].startswith("red_ball (ball): dino ")
    assert math.isclose(cli.trainer.callback_metrics["test/dino"].item(), report["mean"]["dino"], rel_tol=1e-6)


def test_the_runs_own_subject_from_a_checkpoint(lora_export, tmp_path, toy_subject_dir):
    args = ['--data.eval_prompts=["a {identifier} {class_noun} in the snow"]', "--data.pres_prompt=null"]
    ckpt = ["--ckpt_path", str(lora_export / "checkpoints" / "last.ckpt")]
    cli = cli_main(_test_args(tmp_path, toy_subject_dir, *args, *ckpt))
    report = json.loads((run_dir(cli.trainer) / "eval" / "report.json").read_text())
    (name,) = report["subjects"]
    assert name == toy_subject_dir.name and report["subjects"][name]["class"] == "ball"
    assert report["model"]["checkpoint"] == str(lora_export / "checkpoints" / "last.ckpt")
    assert "pres" not in report["mean"] and math.isfinite(report["mean"]["div"])


def test_unknown_subject_is_named(bench_dir, tmp_path, toy_subject_dir):
    args = [f"--data.eval_data_dir={bench_dir}", "--data.eval_subjects=[red_ball, green_cat]"]
    with pytest.raises(ValueError, match=r"data\.eval_subjects.*green_cat"):
        cli_main(_test_args(tmp_path, toy_subject_dir, *args))


def test_run_configs_saved_with_grid_size_still_parse(capsys):
    """Run configs saved before ``evaluation.cell_size`` replaced ``evaluation.grid_size`` keep loading for ``test``."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["test", "--config", str(ROOT / "configs" / "tiny.yaml"), "--evaluation.grid_size=256", "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    assert "grid_size: 256" in capsys.readouterr().out
