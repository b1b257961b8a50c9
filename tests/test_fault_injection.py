"""Fault injection: real ``train.py fit`` processes are SIGKILLed at random points, resumed from ``last.ckpt``,
and end with the same weights, bit for bit, as an uninterrupted run.

Kills land anywhere: while Python starts, while the model loads, in a training step, while a checkpoint is being
written (one is written after every step), during the export. The RNG is seeded, so the kill plan is reproducible;
where each kill lands still depends on the machine's speed (FAULT_INJECTION_SEED=<n> draws another plan). Marked slow (several processes: about 1.5-3 minutes on
2 CPU cores); run it with ``pytest -m slow tests/test_fault_injection.py``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, fit_args

STEPS = 12
MAX_KILLS = 3
EXTRA = (
    "--trainer.callbacks.init_args.every_n_train_steps=1",  # a checkpoint after every step: many writes to hit
    "--trainer.callbacks+=tests.helpers.ReportStep",
    "--trainer.logger.init_args.version=run",  # one run folder, so that last.ckpt keeps its path across restarts
)


def _start(args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """Start ``train.py``; a thread collects its output lines (stdout and stderr together)."""
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def _last_step(lines: list[str]) -> int:
    steps = [int(m.group(1)) for line in list(lines) if (m := re.match(r"fault-injection: step (\d+)", line))]
    return max(steps, default=-1)


def _run_dir(root: Path) -> Path:
    return root / "runs" / "lightning_logs" / "run"  # fit_args: CSVLogger, default name


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(_run_dir(root) / "export" / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five train.py processes; several times longer on a loaded machine
def test_sigkilled_runs_resume_to_the_same_weights_as_an_uninterrupted_run(tmp_path, toy_subject_dir, class_images_dir):
    rng = random.Random(int(os.environ.get("FAULT_INJECTION_SEED", "20240607")))
    roots = {name: tmp_path / name for name in ("reference", "faulty")}
    for root in roots.values():
        shutil.copytree(class_images_dir, root / "class")

    def args(name: str, *more: str) -> list[str]:
        root = roots[name]
        return fit_args(root / "runs", toy_subject_dir, root / "class", *EXTRA, *more, steps=STEPS)

    started = time.monotonic()
    proc, lines = _start(args("reference"))
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    reference_seconds = time.monotonic() - started
    print(f"reference run: {reference_seconds:.0f} s", flush=True)

    kills, log = 0, []
    last_ckpt = _run_dir(roots["faulty"]) / "checkpoints" / "last.ckpt"
    for attempt in range(MAX_KILLS + 1):
        resume = ["--ckpt_path", str(last_ckpt)] if last_ckpt.exists() else []
        resumed_from = torch.load(last_ckpt, weights_only=True)["global_step"] if resume else 0
        proc, lines = _start(args("faulty", *resume))
        if attempt < MAX_KILLS:
            if rng.random() < 0.25:  # a kill during start-up or model loading
                time.sleep(rng.uniform(0, 0.5 * reference_seconds))
                where = "start-up"
            else:  # a kill at a random moment after a random step
                target = rng.randint(resumed_from + 1, STEPS)
                while _last_step(lines) < target and proc.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, 0.4))
                where = f"after step {_last_step(lines)}"
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                log.append(f"attempt {attempt}: resumed from step {resumed_from}, SIGKILL {where}")
                print(log[-1], f"({time.monotonic() - started:.0f} s)", flush=True)
                continue
        assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
        log.append(f"attempt {attempt}: resumed from step {resumed_from}, ran to the end")
        break
    print("\n".join(log))

    assert kills >= 1, log
    reference, faulty = _weights(roots["reference"]), _weights(roots["faulty"])
    assert reference.keys() == faulty.keys()
    differ = [k for k in reference if not torch.equal(reference[k], faulty[k])]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ after {kills} kills: {log}"
