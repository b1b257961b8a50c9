"""A resumed run ends with the same weights, bit for bit, as an uninterrupted one (CPU, tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import cli_main

STEPS = 5  # the demo data gives 2 batches per epoch: step 2 ends an epoch, step 3 is in the middle of one


def export_of(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:2]}"


@pytest.fixture
def uninterrupted(run_args):
    """A STEPS-step run that saves a checkpoint at every step."""
    every_step = ("--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1")
    return cli_main(run_args(*every_step, steps=STEPS))


def test_resuming_from_any_checkpoint_gives_the_same_weights_bitwise(run_args, uninterrupted):
    reference = export_of(uninterrupted)
    checkpoints = Path(uninterrupted.trainer.log_dir) / "checkpoints"
    for k in (2, 3):  # at an epoch's end and in the middle of an epoch
        (ckpt,) = checkpoints.glob(f"*-step={k}.ckpt")
        resumed = cli_main(run_args(steps=STEPS) + ["--ckpt_path", str(ckpt)])
        assert resumed.trainer.global_step == STEPS
        assert_same_weights(export_of(resumed), reference)
