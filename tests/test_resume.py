"""A resumed run ends with the same weights, bit for bit, as an uninterrupted one (CPU, tiny model).

Interruptions covered: a checkpoint at an epoch's end and one in the middle of an epoch (as a SIGKILL leaves them),
SIGTERM and Ctrl-C (which save a checkpoint first). A second Ctrl-C stops at once and saves nothing.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fit_args
from train import cli_main

STEPS = 5  # the demo data gives 2 batches per epoch: step 2 ends an epoch, step 3 is in the middle of one


def export_of(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:2]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_subject_dir, class_images_dir):
    """An uninterrupted STEPS-step run that saves a checkpoint at every step: (checkpoint folder, final weights)."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(class_images_dir, root / "class")
    every_step = ("--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1")
    cli = cli_main(fit_args(root / "runs", toy_subject_dir, root / "class", *every_step, steps=STEPS))
    return Path(cli.trainer.log_dir) / "checkpoints", export_of(cli)


def _resume(run_args, ckpt: Path, *overrides: str):
    resumed = cli_main(run_args(*overrides, steps=STEPS) + ["--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == STEPS
    return export_of(resumed)


@pytest.mark.parametrize("k", [2, 3], ids=["epoch-end", "mid-epoch"])
def test_resuming_from_a_checkpoint_gives_the_same_weights_bitwise(run_args, reference, k):
    checkpoints, weights = reference
    (ckpt,) = checkpoints.glob(f"*-step={k}.ckpt")
    assert_same_weights(_resume(run_args, ckpt), weights)


def test_resuming_twice_gives_the_same_weights_bitwise(run_args, reference, tmp_path):
    """A checkpoint written by a resumed run resumes right too (Lightning's epoch counters differ in it)."""
    checkpoints, weights = reference
    (ckpt,) = checkpoints.glob("*-step=2.ckpt")
    _resume(
        run_args,
        ckpt,
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--trainer.callbacks.init_args.save_top_k=-1",
    )
    (second,) = (tmp_path / "runs").rglob("*-step=4.ckpt")
    assert_same_weights(_resume(run_args, second), weights)


@pytest.mark.parametrize(
    "sender, signum, status",
    [("SendSignal", signal.SIGTERM, 143), ("SendSignalLate", signal.SIGTERM, 143), ("SendSignal", signal.SIGINT, 1)],
    ids=["SIGTERM", "SIGTERM-after-the-callback", "Ctrl-C"],
)
def test_a_signal_saves_a_checkpoint_then_resuming_gives_the_same_weights(
    run_args, reference, tmp_path, sender, signum, status
):
    send = (f"--trainer.callbacks+=tests.helpers.{sender}", "--trainer.callbacks.step=3")
    sigint_handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as exit_info:
        cli_main(run_args(*send, f"--trainer.callbacks.signum={int(signum)}", steps=STEPS))
    assert exit_info.value.code == status
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is sigint_handler  # Ctrl-C works as before again
    assert_same_weights(_resume(run_args, last), reference[1])


def test_a_second_ctrl_c_stops_at_once_without_saving(run_args, tmp_path):
    every_2 = "--trainer.callbacks.init_args.every_n_train_steps=2"
    send = ("--trainer.callbacks+=tests.helpers.SendSignal", "--trainer.callbacks.step=3")
    with pytest.raises(SystemExit):
        cli_main(run_args(every_2, *send, f"--trainer.callbacks.signum={int(signal.SIGINT)}", "--trainer.callbacks.times=2", steps=STEPS))  # fmt: skip
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # the step-3 save never ran
