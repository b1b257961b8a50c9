"""Watching training through the CLI: prompt grids, DINO / CLIP metrics, W&B offline, CSV-only runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import wandb
from PIL import Image

from callbacks.run_dir import run_dir
from tests.wandb_records import history
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
WANDB = [
    "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
    "--trainer.logger.offline=true",
    "--trainer.logger.project=test",
]


def _wandb_run_file(save_dir: Path) -> Path:
    (run_file,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_file


def test_wandb_offline_run_holds_grids_and_metrics(run_args, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.finish()  # no run left over from another test in this process: the logger would reuse it
    save_dir = tmp_path / "wb"
    monkeypatch.setenv("WANDB_DIR", str(save_dir))
    cli = cli_main(run_args(*WANDB, f"--trainer.logger.save_dir={save_dir}", "--trainer.val_check_interval=2", steps=4))
    wandb.finish()  # a script's exit flushes the run file; in-process, finish it first
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
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "seed", "image"] and "dino" in table["columns"]
    assert len(table["data"]) == 5 * 2  # 4 prompts + the PRES prompt, 2 images each
    # Grids on disk too, one per validation, and the best-DINO checkpoint.
    folder = run_dir(cli.trainer)
    assert sorted(p.name for p in (folder / "grids").glob("*.png")) == [
        "step_000000.png",
        "step_000002.png",
        "step_000004.png",
    ]
    assert list((folder / "checkpoints").glob("best-dino-*.ckpt"))
    assert 0.0 <= rows[-1].get("val/dino", 0.5) <= 1.0


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
