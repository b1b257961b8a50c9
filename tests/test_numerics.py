"""A NaN loss stops the run naming the step (or skips the step); NaN weights never replace a good checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.numerics import NonFiniteLossError, NonFiniteWeightsError
from train import cli_main

EVERY_STEP = ("--trainer.callbacks.init_args.every_n_train_steps=1",)


def _checkpoint(run_dir: Path) -> dict:
    (last,) = run_dir.rglob("last.ckpt")
    return torch.load(last, map_location="cpu", weights_only=True)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(run_args, tmp_path):
    args = run_args(
        *EVERY_STEP, "--trainer.callbacks+=tests.helpers.PoisonBatch", "--trainer.callbacks.step=3", steps=5
    )
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3 \(epoch 1, batch 0\).*nan_policy=skip"):
        cli_main(args)
    ckpt = _checkpoint(tmp_path / "runs")
    assert ckpt["global_step"] == 2 and _all_finite(ckpt["state_dict"])
    assert not list((tmp_path / "runs").rglob("export"))  # no export of an unfinished run
    # The advice in the message works: resuming with nan_policy=skip goes past the bad step.
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    with pytest.warns(UserWarning, match="Skipping this optimizer step"):
        resumed = cli_main(args + ["--model.nan_policy=skip", "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == 5 and resumed.model.nan_policy == "skip"


def test_nan_loss_with_skip_policy_skips_only_that_step(run_args):
    poison = ("--trainer.callbacks+=tests.helpers.PoisonBatch", "--trainer.callbacks.step=3")
    record = "--trainer.callbacks+=tests.helpers.RecordWeights"
    with pytest.warns(UserWarning, match=r"optimizer step 3.*Skipping this optimizer step"):
        cli = cli_main(run_args("--model.nan_policy=skip", *poison, record, steps=4))
    assert cli.trainer.global_step == 4
    by_step = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RecordWeights").by_step
    assert all(torch.equal(by_step[3][n], by_step[2][n]) for n in by_step[2])  # step 3 changed nothing
    assert any(not torch.equal(by_step[4][n], by_step[3][n]) for n in by_step[3])  # step 4 trained again
    assert all(_all_finite(by_step[s]) for s in by_step)


def test_nan_weights_are_never_saved_over_a_good_checkpoint(run_args, tmp_path):
    poison = ("--trainer.callbacks+=tests.helpers.PoisonWeights", "--trainer.callbacks.step=2")
    with pytest.raises(NonFiniteWeightsError, match=r"Not saving a checkpoint at step 2.*previous checkpoint is kept"):
        cli_main(run_args(*EVERY_STEP, *poison, steps=4))
    ckpt = _checkpoint(tmp_path / "runs")
    assert ckpt["global_step"] == 1 and _all_finite(ckpt["state_dict"])
    assert not list((tmp_path / "runs").rglob(".*.tmp"))  # no half-written file left behind


def test_nan_policy_is_checked_at_parse_time(run_args):
    with pytest.raises(SystemExit):
        cli_main(run_args("--model.nan_policy=ignore"))
