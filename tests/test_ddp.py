"""A 2-process DDP fit on the CPU (gloo), as a user launches it: class images made once, prompts spread across
ranks, metrics synchronized, files written by rank 0 only, no hang at the end."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

from callbacks.pictures import read_layout
from callbacks.run_dir import run_dir
from tests.conftest import fit_args
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _val_rows(metrics_csv: Path) -> dict[int, dict]:
    with open(metrics_csv) as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("val/dino")}


def test_two_process_ddp_fit(run_args, tmp_path):
    args = run_args(steps=2)
    args[args.index("--data.class_data_dir") + 1] = str(tmp_path / "ddp_class")  # an empty folder: generated here
    ddp = ["--data.class_images_inference_steps=2", "--trainer.strategy=ddp", "--trainer.devices=2"]
    result = subprocess.run(
        [sys.executable, "train.py", *args, *ddp], cwd=ROOT, capture_output=True, text=True, timeout=420
    )
    assert result.returncode == 0, result.stderr[-4000:]

    # Class images: generated once in total, none missing, none twice.
    class_dir = tmp_path / "ddp_class"
    assert sorted(p.name for p in class_dir.glob("*.png")) == [f"class_{i:05d}.png" for i in range(4)]
    record = json.loads((class_dir / "class_images.json").read_text())
    assert len(record["images"]) == 4
    assert result.stdout.count("Exported trained weights to") + result.stderr.count("Exported trained weights to") == 1

    # Rank 0 alone wrote the run directory: one version, with the export, grids and logs.
    (version,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    assert (version / "export" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (version / "grids").glob("*.png")) == [
        "progress.png",
        "step_000000.png",
        "step_000002.png",
    ]
    # Every prompt rendered once across the two ranks: 4 subject prompts + the PRES prompt, 2 images each.
    layout = read_layout(version / "grids" / "step_000000.png")
    assert [r["kind"] for r in layout["rows"]] == ["reference"] + ["renders"] * 5
    assert all(len(r["cells"]) == 2 for r in layout["rows"][1:])
    strip = read_layout(version / "grids" / "progress.png")  # one column per validation, drawn by rank 0
    assert [len(r["cells"]) for r in strip["rows"][1:]] == [2] * 4
    # The summary, printed once (rank 0), last.
    assert result.stdout.count("fit finished at step 2. Where to look:") == 1
    assert result.stdout.rstrip().splitlines()[-1].startswith("  val/div ")
    ddp_rows = _val_rows(version / "metrics.csv")
    assert sorted(ddp_rows) == [0, 2]

    # Synchronized metrics: the baseline (step 0) equals a single process's, which rendered every prompt itself.
    single = cli_main(run_args(steps=1))
    single_rows = _val_rows(run_dir(single.trainer) / "metrics.csv")
    for name in ("val/dino", "val/clip_i", "val/clip_t", "val/pres", "val/div"):
        assert abs(float(ddp_rows[0][name]) - float(single_rows[0][name])) < 1e-4, name


def test_fewer_prompts_than_ranks_then_resumed_on_another_number_of_processes(tmp_path, class_images_dir, monkeypatch):
    """One 2-process fit (a costly launch) checked for two things.

    Fewer prompts than ranks: ``--data.validation_prompts '[]'`` leaves the PRES prompt alone for two ranks. Rank 1
    runs its (padding) step like rank 0 and takes part in every gather; the prompt is rendered once. (Before, rank 1's
    empty loader stopped the run: "DataLoader within local rank has zero length".)

    Resuming on another number of processes: the fit stops after its first step of a 3-step epoch and is resumed in 1
    process: every photo of the interrupted epoch is trained on exactly once across the two runs (each photo's caption
    names it)."""
    from datamodules.toy_subject import draw_toy_subject

    photos = tmp_path / "photos"
    for k, path in enumerate(draw_toy_subject(photos, num_images=12, resolution=64, seed=0)):
        path.with_suffix(".txt").write_text(f"a photo of {{identifier}} {{class_noun}} number {k}", encoding="utf-8")
    record = tmp_path / "prompts.txt"
    common = [
        "--data.instance_data_dir", str(photos), "--data.random_flip=false", "--data.batch_size=2",
        "--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks+=tests.helpers.RecordInstancePrompts",
    ]  # fmt: skip
    args = fit_args(tmp_path / "runs", photos, tmp_path / "class", *common, "--data.validation_prompts", "[]", steps=1)
    shutil.copytree(class_images_dir, tmp_path / "class")
    monkeypatch.setenv("RECORD_PROMPTS", str(record))  # read by RecordInstancePrompts, here and in the subprocesses
    cmd = [sys.executable, "train.py", *args, "--trainer.strategy=ddp", "--trainer.devices=2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    (version,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    layout = read_layout(version / "grids" / "step_000000.png")
    assert [r["kind"] for r in layout["rows"]] == ["reference", "renders"]  # the PRES prompt, once
    assert "val/pres" in _val_rows(version / "metrics.csv")[0]
    (last,) = (tmp_path / "runs").rglob("last.ckpt")

    # 12 photos, 2 per rank per step: the epoch is 3 steps on 2 ranks, 6 on 1; 1 done, 4 of the 12 photos seen.
    no_validation = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
    resumed = cli_main(
        fit_args(tmp_path / "runs", photos, tmp_path / "class", *common, *no_validation, steps=5)
        + ["--ckpt_path", str(last)]
    )
    assert resumed.trainer.global_step == 5

    rows = [line.split(" ", 3) for line in record.read_text(encoding="utf-8").splitlines()]
    first = [r for r in rows if r[1] == "0"]
    assert sorted(r[2] for r in first) == ["0", "0", "1", "1"]  # step 0: both ranks, 2 photos each
    epoch0 = [r[3] for r in rows if r[0] == "0"]
    assert len(rows) == 4 + 4 * 2 and len(epoch0) == 12
    assert sorted(epoch0) == sorted(f"a photo of sks ball number {k}" for k in range(12))


def test_fewer_prompts_than_ranks_predict(toy_subject_dir, tmp_path):
    """Two ranks, one prompt to ``predict``: the prompt is rendered once."""
    out = tmp_path / "predicted"
    cmd = [
        sys.executable, "train.py", "predict",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.default_root_dir", str(tmp_path / "predict_runs"),
        "--trainer.strategy=ddp", "--trainer.devices=2",
        "--data.instance_data_dir", str(toy_subject_dir),
        "--data.class_data_dir", str(tmp_path / "no_class_images_needed"),
        '--data.predict_prompts=["a photo of {identifier} {class_noun}"]',
        "--model.sampling.num_inference_steps=2", "--model.sampling.num_images_per_prompt=1",
        f"--render.dirpath={out}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(out.glob("0*.png"))) == 1
