"""Watching training through the CLI: prompt grids, DINO / CLIP metrics, W&B offline, CSV-only runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from callbacks.pictures import read_layout
from callbacks.run_dir import run_dir
from datamodules.datasets import as_trained
from datamodules.images import load_image
from tests.wandb_records import history
from train import cli_main, run

ROOT = Path(__file__).resolve().parents[1]
WANDB = [
    "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
    "--trainer.logger.offline=true",
    "--trainer.logger.project=test",
]


def _wandb_run_file(save_dir: Path) -> Path:
    (run_file,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_file


def test_wandb_offline_run_holds_grids_and_metrics(run_args, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.finish()  # no run left over from another test in this process: the logger would reuse it
    save_dir = tmp_path / "wb"
    monkeypatch.setenv("WANDB_DIR", str(save_dir))
    cli = run(run_args(*WANDB, f"--trainer.logger.save_dir={save_dir}", "--trainer.val_check_interval=2", steps=4))
    wandb.finish()  # a script's exit flushes the run file; in-process, finish it first (run() did, for the summary)
    wandb.teardown()  # and leave no W&B service or settings behind for later tests in this process
    rows = history(_wandb_run_file(save_dir))
    metric_steps = {
        name: sorted(r["trainer/global_step"] for r in rows if name in r)
        for name in ("val/dino", "val/clip_i", "val/clip_t", "val/pres", "val/div")
    }
    # Before training (the base model's baseline), every 2 steps, and at the end.
    assert metric_steps == dict.fromkeys(metric_steps, [0, 2, 4])
    grid_rows = [r for r in rows if "val/grid" in r or "val/grid/filenames" in r]
    assert len(grid_rows) == 3
    media = list(save_dir.glob("wandb/offline-run-*/files/media/images/val/grid_*.png"))
    tables = list(save_dir.glob("wandb/offline-run-*/files/media/table/val/samples_*.table.json"))
    assert len(media) == 3 and len(tables) == 3
    (progress,) = save_dir.glob("wandb/offline-run-*/files/media/images/val/progress_*.png")  # logged once, at the end
    assert Image.open(progress).size == Image.open(run_dir(cli.trainer) / "grids" / "progress.png").size
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "seed", "image"] and "dino" in table["columns"]
    assert len(table["data"]) == 5 * 2  # 4 prompts + the PRES prompt, 2 images each
    # Grids on disk too, one per validation, and the best-DINO checkpoint.
    folder = run_dir(cli.trainer)
    assert sorted(p.name for p in (folder / "grids").glob("step_*.png")) == [
        "step_000000.png",
        "step_000002.png",
        "step_000004.png",
    ]
    assert list((folder / "checkpoints").glob("best-dino-*.ckpt"))
    assert 0.0 <= rows[-1].get("val/dino", 0.5) <= 1.0
    # The summary names the W&B run's folder and how to upload it.
    (run_folder,) = save_dir.glob("wandb/offline-run-*")
    assert f"W&B run          {run_folder} (offline; upload with: wandb sync {run_folder})" in capsys.readouterr().out


def test_csv_logger_only(run_args):
    cli = cli_main(run_args("--trainer.val_check_interval=2", steps=2))
    folder = run_dir(cli.trainer)
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    dino = [(r["step"], r["val/dino"]) for r in rows if r.get("val/dino")]
    assert [step for step, _ in dino] == ["0", "2"]
    grid = Image.open(folder / "grids" / "step_000002.png")
    assert grid.width >= 2 * 64 and grid.height > 5 * 64


def test_grid_is_fixed_by_the_seeds_and_takes_non_square_sizes(run_args):
    args = ["--model.sampling.width=96", "--model.sampling.height=64", "--trainer.max_steps=1"]
    first = run_dir(cli_main(run_args(*args, steps=1)).trainer) / "grids" / "step_000000.png"
    again = run_dir(cli_main(run_args(*args, "--data.validation_batch_size=2", steps=1)).trainer)
    a = np.asarray(Image.open(first), dtype=np.int16)
    b = np.asarray(Image.open(again / "grids" / "step_000000.png"), dtype=np.int16)
    assert a.shape == b.shape and a.shape[1] >= 2 * 96
    # The same seeds render the same baseline grid, whatever the prompts' batching (8-bit rounding aside).
    assert np.abs(a - b).max() <= 1


def test_unknown_placeholder_fails_at_config_time(run_args):
    with pytest.raises(ValueError, match=r"data\.validation_prompts.*\{subject\}"):
        cli_main(run_args('--data.validation_prompts=["a {subject} on the moon"]'))


def test_class_noun_defaults_to_the_words_after_the_identifier(run_args):
    cli = cli_main(run_args("--data.class_noun=null", "--data.instance_prompt=a photo of sks toy ball", steps=1))
    assert cli.datamodule.val_dataset.rows[0][0] == "a photo of sks toy ball"
    with pytest.raises(ValueError, match=r"data\.class_noun"):
        cli_main(run_args("--data.class_noun=null", "--data.instance_prompt=a photo of a ball sks", steps=1))


def test_validate_subcommand_renders_from_a_checkpoint(run_args):
    cli = cli_main(run_args(steps=1))
    ckpt = cli.trainer.checkpoint_callback.last_model_path or str(
        next((run_dir(cli.trainer) / "checkpoints").glob("*.ckpt"))
    )
    args = run_args(steps=1)
    args[0] = "validate"
    validated = cli_main([*args, "--ckpt_path", ckpt])
    assert "val/dino" in validated.trainer.callback_metrics


@pytest.mark.parametrize("sweep", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_files_name_real_options(sweep, capsys):
    import yaml

    spec = yaml.safe_load(sweep.read_text())
    assert spec["metric"]["name"].startswith("val/") and spec["metric"]["goal"] in ("maximize", "minimize")
    command = spec["command"]
    config = command[command.index("--config") + 1]
    overrides = [f"--{name}={values['values'][-1]}" for name, values in spec["parameters"].items()]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / config), *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, values in spec["parameters"].items():
        group, option = name.split(".")
        assert printed[group][option] == values["values"][-1]


def _trained(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


def test_grids_show_the_subject_beside_readable_captioned_renders_and_the_progress(run_args, toy_subject_dir, capsys):
    """... and the pictures change nothing in training (the same fit without grid and summary, compared at the end)."""
    cli = run(run_args("--trainer.val_check_interval=1", steps=2))  # as `python train.py fit` runs: then the summary
    folder = run_dir(cli.trainer) / "grids"
    grid = np.asarray(Image.open(folder / "step_000002.png"))
    layout = read_layout(folder / "step_000002.png")
    assert layout["title"][0].startswith("step 2   val/dino ")
    assert layout["title"][1].startswith("dpm++, 3 steps, CFG 5 | 64x64 px | LoRA scale UNet 1, text encoder 1")
    # The reference row: the subject's photos as trained (64 px, center crop), enlarged x 4, labelled.
    reference, *renders = layout["rows"]
    photos = sorted(toy_subject_dir.glob("*.png"))
    assert reference["kind"] == "reference"
    assert reference["label"] == "the subject: 4 photos as trained (64 px, center crop)"
    assert [c["caption"] for c in reference["cells"]] == [[p.name] for p in photos]
    for cell, photo in zip(reference["cells"], photos, strict=True):
        x0, y0, x1, y1 = cell["box"]
        assert np.array_equal(
            grid[y0:y1, x0:x1], np.asarray(as_trained(load_image(photo), 64)).repeat(4, 0).repeat(4, 1)
        )
    # The renders: 64 px -> 256 px cells (nearest neighbour), each captioned with its seed and scores.
    assert [r["label"] for r in renders] == [cli.datamodule.val_dataset.rows[i][0] for i in range(4)] + [
        "a ball (the class prompt)"
    ]
    assert all(
        c["box"][2] - c["box"][0] == 256 and c["box"][3] - c["box"][1] == 256 for r in renders for c in r["cells"]
    )
    caption = renders[1]["cells"][1]["caption"]
    assert (
        caption[0].startswith("seed 1001, dino ") and "clip-i " in " ".join(caption) and "clip-t " in " ".join(caption)
    )
    assert renders[4]["cells"][0]["caption"][0].startswith("seed 4000, pres ")
    # The progress strip: the subject, then the first 4 prompts, one column per validation step with its val/dino.
    strip = read_layout(folder / "progress.png")
    assert [r["kind"] for r in strip["rows"]] == ["reference"] + ["progress"] * 4
    with open(run_dir(cli.trainer) / "metrics.csv") as f:
        dino = {int(r["step"]): float(r["val/dino"]) for r in csv.DictReader(f) if r.get("val/dino")}
    assert sorted(dino) == [0, 1, 2]
    for row in strip["rows"][1:]:
        assert [c["caption"] for c in row["cells"]] == [[f"step {s}, val/dino {dino[s]:.3f}"] for s in (0, 1, 2)]
    # Its last column is image 1 of each prompt in the last grid, pixel for pixel.
    pixels = np.asarray(Image.open(folder / "progress.png"))
    for row, grid_row in zip(strip["rows"][1:], renders, strict=False):
        a, b = row["cells"][-1]["box"], grid_row["cells"][0]["box"]
        assert np.array_equal(pixels[a[1] : a[3], a[0] : a[2]], grid[b[1] : b[3], b[0] : b[2]])
    # fit ends by printing where to look and the first / last validation metrics.
    out = capsys.readouterr().out
    summary = out[out.index("fit finished at step 2. Where to look:") :].splitlines()
    assert f"  run directory    {run_dir(cli.trainer)}" in summary
    assert f"  progress strip   {folder / 'progress.png'}" in summary
    assert f"  export           {run_dir(cli.trainer) / 'export'}" in summary
    assert summary[-6].split() == ["val/*", "step", "0", "step", "2", "change"]
    assert summary[-5].split()[:3] == ["val/dino", f"{dino[0]:.3f}", f"{dino[2]:.3f}"]
    assert summary[-1].startswith("  val/div ")  # the last thing printed

    # The pictures change nothing in training: the same fit without them trains the same weights, bit for bit.
    with_pictures = _trained(cli)
    without = _trained(cli_main(run_args("--trainer.val_check_interval=1", "--grid.enabled=false", "--summary.enabled=false", steps=2)))  # fmt: skip
    assert with_pictures.keys() == without.keys()
    assert all(torch.equal(with_pictures[n], without[n]) for n in with_pictures)


def test_the_progress_strip_and_summary_survive_a_resume(run_args, capsys):
    every_step = "--trainer.callbacks.init_args.every_n_train_steps=1"
    first = cli_main(run_args("--trainer.val_check_interval=1", every_step, steps=1))
    ckpt = run_dir(first.trainer) / "checkpoints" / "last.ckpt"  # saved at step 1, before step 1's validation
    resumed = run([*run_args("--trainer.val_check_interval=1", steps=2), "--ckpt_path", str(ckpt)])
    assert run_dir(resumed.trainer) != run_dir(first.trainer)  # a new run directory: the strip came from the checkpoint
    strip = read_layout(run_dir(resumed.trainer) / "grids" / "progress.png")
    steps = [c["caption"][0].split(",")[0] for c in strip["rows"][1]["cells"]]
    # Step 0 was rendered by the first process; step 1's validation ran after the checkpoint was saved, and Lightning
    # does not repeat it on resume (it is in the first run's grids); step 2 is the resumed run's.
    assert steps == ["step 0", "step 2"]
    assert "  val/*       step 0  step 2  change" in capsys.readouterr().out
