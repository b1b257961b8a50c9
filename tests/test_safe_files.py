"""Atomic writes survive crashes; checkpoints load without running code, whatever the caller asks."""

from __future__ import annotations

import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from callbacks.fault_tolerance import SafeCheckpointIO
from core.errors import UserInputError
from core.safe_files import UnsafeCheckpointError, atomic_torch_save, atomic_write, safe_torch_load
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled without restriction, it writes ``marker``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "the payload ran")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint, with a payload among its values."""
    torch.save({"state_dict": {}, "global_step": 0, "hyper_parameters": {"x": Payload(marker)}}, path)
    return path


def test_the_payload_is_live_with_an_unrestricted_unpickler(tmp_path):
    """The control: Lightning's own CheckpointIO, asked for weights_only=False, runs it."""
    marker = tmp_path / "pwned"
    TorchCheckpointIO().load_checkpoint(malicious_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_safe_loading_refuses_the_payload_whatever_is_asked(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch for unrestricted loading
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*Nothing in it was run"):
        safe_torch_load(evil)
    with pytest.warns(UserWarning, match="weights_only=False is ignored"), pytest.raises(UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)


def test_ckpt_path_with_a_malicious_pickle_is_refused_and_the_payload_never_runs(run_args, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights.only") as err:
        cli_main(run_args(steps=1) + ["--ckpt_path", str(evil), "--weights_only=false"])
    assert isinstance(err.value, UserInputError)  # the command line prints it without a traceback
    assert not marker.exists()


UNSAFE_CALLS = (
    r"weights_only\s*=\s*False\s*[,)]",
    r"pickle\.loads?\(",
    r"trust_remote_code\s*=\s*True",
    r"allow_pickle\s*=\s*True",
)


def test_no_source_file_unpickles_without_restriction_or_trusts_remote_code():
    sources = [
        p for d in ("lightning_modules", "sd", "core", "datamodules", "callbacks") for p in (ROOT / d).rglob("*.py")
    ]
    sources.append(ROOT / "train.py")
    for path in sources:
        text = path.read_text()
        for call in UNSAFE_CALLS:
            assert not re.search(call, text), f"{path.relative_to(ROOT)} matches {call}"


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"), atomic_write(target) as f:
        f.write(b"half of the new")
        raise OSError("disk full")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_checkpoint_io_keeps_the_previous_checkpoint_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


WRITER = """
import sys, torch
from core.safe_files import atomic_torch_save
step = 0
while True:
    step += 1
    atomic_torch_save({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])  # 16 MB
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # the first checkpoint is written; more are being written all the time
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = safe_torch_load(path)
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["step"])))
        atomic_torch_save({"step": 0}, tmp_path / "other.ckpt")  # writes still work beside leftovers
