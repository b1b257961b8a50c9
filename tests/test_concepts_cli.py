"""Several subjects in one run (data.concepts) through the CLI: every concept's photos with its own prompt and repeat
count, validation scored per concept against its own photos (val/dino/<name>, their mean as val/dino), test per
concept, one concept training bit for bit as the plain options, the example config, and bad concepts named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageOps
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from core.errors import ConfigError, InputNotFoundError
from tests.conftest import fit_args
from tests.helpers import RecordPrompts
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("--trainer.num_sanity_val_steps=0", "--trainer.callbacks+=tests.helpers.RecordPrompts")


def _other_look(src: Path, dst: Path) -> Path:
    """The toy subject's photos with their colours inverted: a second subject of another look."""
    dst.mkdir(parents=True, exist_ok=True)
    for photo in sorted(src.glob("*.png")):
        ImageOps.invert(Image.open(photo).convert("RGB")).save(dst / photo.name)
    return dst


def _overlay(path: Path, concepts: list[dict]) -> Path:
    data = {"instance_data_dir": None, "instance_prompt": None, "concepts": concepts}
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def _export(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def two_concepts(tmp_path_factory, toy_subject_dir, class_images_dir):
    """One fit of two concepts (the toy subject, and its inverted colours twice per epoch), validated at its end."""
    tmp = tmp_path_factory.mktemp("concepts")
    shutil.copytree(class_images_dir, tmp / "class")
    other = _other_look(toy_subject_dir, tmp / "inverted")
    concepts = [
        {"name": "ball", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"},
        {"name": "inverted", "instance_data_dir": str(other), "instance_prompt": "a photo of zwx ball",
         "identifier": "zwx", "repeats": 2},
    ]  # fmt: skip
    overlay = _overlay(tmp / "concepts.yaml", concepts)
    args = fit_args(tmp / "runs", toy_subject_dir, tmp / "class", *QUIET, "--config", str(overlay), steps=6)
    sampling = ("--model.sampling.num_inference_steps=2", "--model.sampling.num_images_per_prompt=1")
    cli = cli_main([*args, "--trainer.val_check_interval=6", *sampling])
    return cli, tmp


def test_each_concept_trains_on_its_own_prompt_as_often_as_its_repeats(two_concepts):
    cli, _ = two_concepts
    rec = next(c for c in cli.trainer.callbacks if isinstance(c, RecordPrompts))
    rows = [p for batch in rec.prompts for p in batch]  # one epoch: 4 + 2 x 4 items, 6 batches of 2
    assert rows.count("a photo of sks ball") == 4 and rows.count("a photo of zwx ball") == 8
    assert rows.count("a photo of ball") == 12  # each item's class row


def test_validation_scores_each_concept_against_its_own_photos(two_concepts):
    cli, _ = two_concepts
    with open(run_dir(cli.trainer) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dino")]
    (row,) = rows
    per = {name: float(row[f"val/dino/{name}"]) for name in ("ball", "inverted")}
    assert float(row["val/dino"]) == pytest.approx((per["ball"] + per["inverted"]) / 2)
    assert per["ball"] != per["inverted"]  # each against its own photos
    assert float(row["val/clip_t/inverted"]) > -1 and float(row["val/pres/ball"]) > -1
    prompts = [r[0] for r in cli.datamodule.val_dataset.rows]
    assert "a photo of zwx ball" in prompts and "a photo of sks ball" in prompts


def test_test_evaluates_each_concept_against_its_own_photos(two_concepts):
    cli, tmp = two_concepts
    ckpt = run_dir(cli.trainer) / "checkpoints" / "last.ckpt"
    args = [
        "test",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--config", str(tmp / "concepts.yaml"),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp / "test_runs"),
        "--trainer.default_root_dir", str(tmp / "test_runs"),
        "--trainer.enable_progress_bar=false",
        "--data.class_data_dir", str(tmp / "class"),
        "--model.sampling.num_inference_steps=2",
        "--data.eval_num_images=1",
        "--data.eval_num_prompts=1",
        "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    test = cli_main(args)
    report = json.loads((run_dir(test.trainer) / "eval" / "report.json").read_text())
    assert list(report["subjects"]) == ["ball", "inverted"]
    assert report["subjects"]["inverted"]["image_dir"].endswith("inverted")
    with open(run_dir(test.trainer) / "eval" / "images.csv") as f:
        prompts = {(r["subject"], r["prompt"]) for r in csv.DictReader(f)}
    assert any(s == "inverted" and "zwx" in p for s, p in prompts) and not any(
        s == "ball" and "zwx" in p for s, p in prompts
    )


def test_one_concept_trains_bitwise_as_the_plain_options(run_args, tmp_path, toy_subject_dir):
    quiet = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false")
    plain = cli_main(run_args(*quiet, steps=3))
    one = [{"instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"}]
    overlay = _overlay(tmp_path / "one.yaml", one)
    single = cli_main(run_args(*quiet, "--config", str(overlay), steps=3))
    a, b = _export(plain), _export(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_concepts_example_config_trains(run_args, tmp_path, toy_subject_dir, class_images_dir):
    example = yaml.safe_load((ROOT / "configs" / "examples" / "concepts.yaml").read_text())
    folders = {"dog": toy_subject_dir, "cat": _other_look(toy_subject_dir, tmp_path / "cat")}
    for concept in example["data"]["concepts"]:  # the example's folders, here
        concept["instance_data_dir"] = str(folders[concept["name"]])
        shutil.copytree(class_images_dir, tmp_path / f"class_{concept['name']}")
        concept["class_data_dir"] = str(tmp_path / f"class_{concept['name']}")
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(example))
    quiet = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false")
    cli = cli_main(run_args(*quiet, "--config", str(tmp_path / "example.yaml"), steps=1))
    assert [c.name for c in cli.datamodule.concepts] == ["dog", "cat"]
    assert [c.class_noun for c in cli.datamodule.concepts] == [None, None]
    assert cli.datamodule.val_dataset.rows[0][0] == "a photo of sks dog"  # tiny.yaml's first validation prompt


def test_concepts_with_buckets_batch_one_size_across_concepts(run_args, tmp_path, toy_subject_dir):
    wide = tmp_path / "wide"
    wide.mkdir()
    for photo in sorted(toy_subject_dir.glob("*.png")):
        Image.open(photo).convert("RGB").crop((0, 16, 64, 48)).save(wide / photo.name)  # 64 x 32
    concepts = [
        {"name": "square", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"},
        {"name": "wide", "instance_data_dir": str(wide), "instance_prompt": "a photo of zwx ball", "identifier": "zwx"},
    ]
    overlay = _overlay(tmp_path / "buckets.yaml", concepts)
    quiet = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false")
    cli = cli_main(run_args(*quiet, "--config", str(overlay), "--data.buckets=true", steps=1))
    data = cli.datamodule.train_dataset
    assert data.buckets == [(48, 80), (64, 64)]
    assert [data.buckets[b] for b in data.bucket_ids] == [(64, 64)] * 4 + [(48, 80)] * 4  # the square one's, then wide
    sampler = cli.trainer.train_dataloader.sampler
    assert all(len({data.bucket_ids[i] for i, _ in batch}) == 1 for batch in sampler.order(0))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"instance_data_dir": "missing"}, InputNotFoundError, r"data\.concepts\[1\]\.instance_data_dir.*missing"),
        ({"name": "ball"}, ConfigError, "name 'ball' is repeated"),
        ({"identifier": "sks", "instance_prompt": "a photo of sks ball"}, ConfigError, "identifier 'sks'"),
        ({"repeats": 0}, ConfigError, r"data\.concepts\[1\]\.repeats"),
    ],
    ids=["missing-folder", "same-name", "same-identifier", "no-repeats"],
)
def test_bad_concepts_fail_early_naming_the_concept(run_args, tmp_path, toy_subject_dir, change, error, match):
    concepts = [
        {"name": "ball", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"},
        {"name": "other", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of zwx ball",
         "identifier": "zwx"},
    ]  # fmt: skip
    concepts[1] |= {k: str(tmp_path / v) if k == "instance_data_dir" else v for k, v in change.items()}
    overlay = _overlay(tmp_path / "bad.yaml", concepts)
    with pytest.raises(error, match=match):
        cli_main(run_args("--config", str(overlay), steps=1))


def test_concepts_and_the_plain_options_together_are_refused(run_args, tmp_path, toy_subject_dir):
    concepts = [{"instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"}]
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({"data": {"concepts": concepts}}))
    with pytest.raises(ConfigError, match="not both"):
        cli_main(run_args("--config", str(tmp_path / "both.yaml"), steps=1))


@pytest.mark.parametrize(
    "option, match",
    [("--data.holdout=1", "data.holdout holds photos of one subject"), ("--data.new_tokens=[<s0>]", "data.new_tokens")],
)
def test_one_subject_options_with_several_concepts_are_refused(run_args, tmp_path, toy_subject_dir, option, match):
    concepts = [
        {"name": "ball", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"},
        {"name": "other", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of zwx ball",
         "identifier": "zwx"},
    ]  # fmt: skip
    overlay = _overlay(tmp_path / "two.yaml", concepts)
    with pytest.raises(ConfigError, match=match):
        cli_main(run_args("--config", str(overlay), option, steps=1))
