"""Loss recipes through the CLI on the tiny model: off by default (bitwise), each one changes what is trained."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from train import cli_main, main


def _fit_export(run_args, *overrides: str) -> dict[str, torch.Tensor]:
    # 3 steps: the first has lr 0 (warmup), and Adam's first update hardly depends on the loss's scale.
    cli = cli_main(run_args("--export.enabled=true", "--grid.enabled=false", *overrides, steps=3))
    return load_file(run_dir(cli.trainer) / "export" / "pytorch_lora_weights.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


NO_VAL = ("--trainer.num_sanity_val_steps=0", "--trainer.val_check_interval=1000", "--trainer.limit_val_batches=0")


def test_loss_recipes_off_by_default_and_each_changes_training(run_args):
    default = _fit_export(run_args, *NO_VAL)
    off = _fit_export(
        run_args, *NO_VAL, "--model.snr_gamma=null", "--model.noise_offset=0", "--model.input_perturbation=0"
    )
    assert _same(default, off), "the loss options at their defaults changed training"
    # gamma 0.5 (not the usual 5): most of the few drawn timesteps have SNR < 5, where the weight is exactly 1.
    for option in ("--model.snr_gamma=0.5", "--model.noise_offset=0.1", "--model.input_perturbation=0.1"):
        assert not _same(default, _fit_export(run_args, *NO_VAL, option)), f"{option} changed nothing"


def test_min_snr_trains_a_v_prediction_model(run_args):
    args = ("--model.pretrained_model_name_or_path=builtin:tiny-sd-v", *NO_VAL)
    plain = _fit_export(run_args, *args)
    weighted = _fit_export(run_args, *args, "--model.snr_gamma=0.5")
    assert all(torch.isfinite(v).all() for v in weighted.values()) and not _same(plain, weighted)


@pytest.mark.parametrize(
    "option", ["--model.snr_gamma=0", "--model.noise_offset=-1", "--model.input_perturbation=-0.1"]
)
def test_bad_loss_options_are_clean_errors(run_args, option, capsys):
    assert main(run_args(option)) == 2
    err = capsys.readouterr().err
    assert f"error: {option.split('=')[0].lstrip('-')} must be" in err and "Traceback" not in err
