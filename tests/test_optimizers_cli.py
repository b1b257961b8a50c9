"""Optimizers and schedules through the CLI on the tiny model: each trains, and the defaults are bitwise unchanged."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from train import cli_main, main

NO_VAL = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--grid.enabled=false")


def _fit(run_args, *overrides: str):
    cli = cli_main(run_args(*NO_VAL, *overrides, steps=3))
    weights = load_file(run_dir(cli.trainer) / "export" / "pytorch_lora_weights.safetensors")
    return cli, weights


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "extra"),
    [
        ("lion", "cosine_with_restarts", ("--model.lr_num_cycles=2", "--model.adam_beta2=0.99")),
        ("adafactor", "polynomial", ("--model.lr_power=2",)),
        ("paged_lion8bit", "constant", ()),
    ],
)
def test_optimizer_and_schedule_train_through_the_cli(run_args, optimizer, scheduler, extra):
    cli, weights = _fit(run_args, f"--model.optimizer={optimizer}", f"--model.lr_scheduler={scheduler}", *extra)
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__.lower().replace("8bit", "").startswith(optimizer.replace("8bit", "").replace("_", ""))
    assert cli.trainer.global_step == 3 and all(torch.isfinite(v).all() for v in weights.values())
    ups = [v for k, v in weights.items() if k.endswith("up.weight")]  # LoRA's up matrices start at 0
    assert any(v.abs().max() > 0 for v in ups), f"{optimizer} did not move the adapters"


def test_schedule_defaults_leave_training_bitwise(run_args):
    _, plain = _fit(run_args)
    _, explicit = _fit(run_args, "--model.lr_num_cycles=1", "--model.lr_power=1.0")
    assert plain.keys() == explicit.keys() and all(torch.equal(plain[k], explicit[k]) for k in plain)


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is not None, reason="prodigyopt is installed here")
def test_prodigy_without_its_package_is_a_clean_early_error(run_args, capsys):
    assert main(run_args("--model.optimizer=prodigy", "--model.learning_rate=1.0")) == 2
    err = capsys.readouterr().err
    assert "error: model.optimizer=prodigy needs the prodigyopt package" in err and "Traceback" not in err


def test_bad_schedule_settings_are_clean_errors(run_args, capsys):
    assert main(run_args("--model.lr_num_cycles=0")) == 2
    assert "error: model.lr_num_cycles must be >= 1" in capsys.readouterr().err
