"""Shared pieces of the benchmarks: the data they train on, timing callbacks, medians."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "  # a child process prints its measurements on one line starting with this


def setup_path() -> None:
    """Make the repository importable when a benchmark runs as ``python bench/<name>.py``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {cpus}-core CPU{gpu}, load average {load:.1f} at start"


def make_data(folder: Path, resolution: int, num_instance: int, num_class: int) -> tuple[Path, Path]:
    """Toy-subject images as instance images, and toy images of other seeds as ready-made class images.

    Ready-made class images keep class-image generation (measured by bench/class_images.py) out of the training
    benchmarks; what the class images show does not change their cost.
    """
    from datamodules.toy_subject import draw_toy_subject

    instance, klass = folder / "instance", folder / "class"
    draw_toy_subject(instance, num_instance, resolution, seed=0)
    draw_toy_subject(klass, num_class, resolution, seed=1)
    return instance, klass


def bench_config(folder: Path) -> Path:
    """``configs/tiny.yaml`` with a CSV logger and no extra callbacks, written into ``folder``: the benchmarks' base.

    Not W&B: a benchmark logs nothing worth keeping, and a machine without wandb installed can run it.
    """
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}
    config["trainer"]["callbacks"] = []
    path = folder / "bench_base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


PHASE_PREFIX = "BENCH_PHASE "  # a child process prints its memory at each phase on lines starting with this


def _proc_status_bytes(keys: tuple[str, ...] = ("VmHWM", "RssAnon", "RssFile")) -> dict[str, int]:
    """This process's peak resident memory so far and its anonymous / file-backed resident memory (Linux)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                values[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return values


class MemoryPhases(pl.Callback):
    """Prints the process's resident memory (peak so far, anonymous, file-backed) at the phases of a fit: after
    set-up (data caches built), at the start of training (model loaded), before and after the first steps' backward;
    so a benchmark can tell whether its peak is set while loading or inside a training step.

    Args:
        steps: The training steps to follow.
    """

    def __init__(self, steps: int = 2) -> None:
        self.steps = steps

    def _mark(self, trainer: pl.Trainer, phase: str) -> None:
        if trainer.global_step < self.steps:
            print(PHASE_PREFIX + json.dumps({"phase": phase, **_proc_status_bytes()}), flush=True)

    def setup(self, trainer, pl_module, stage) -> None:
        self._mark(trainer, "set-up done (caches built)")

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark(trainer, "training starts (model loaded)")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark(trainer, f"step {trainer.global_step + 1}: forward done")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark(trainer, f"step {trainer.global_step + 1}: backward done")


class StepTimer(pl.Callback):
    """Times each optimizer step, from one ``on_train_batch_end`` to the next (so data loading, logging and the
    optimizer are included), and prints the steady-state median when fit ends.

    Args:
        warmup: Steps left out at the start (allocation, first-call overheads, compilation).
    """

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":  # the step ends when the GPU is done with it
            torch.cuda.synchronize()

    def on_train_end(self, trainer, pl_module) -> None:
        steady = self.times[max(0, self.warmup - 1) :]
        result = {"step_s": median(steady), "steps_timed": len(steady)}
        if pl_module.device.type == "cuda":  # the peak of what tensors held on the GPU, and of what torch reserved
            result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
            result["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def memory_status() -> dict[str, float]:
    """This process's resident memory now and at its peak, in GiB (Linux /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields


class MemoryTrace(pl.Callback):
    """Prints the process's resident memory after data set-up, after model set-up and after each step."""

    @staticmethod
    def _print(when: str) -> None:
        print(f"MEMORY {when}: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory_status().items()), flush=True)

    def setup(self, trainer, pl_module, stage) -> None:
        self._print("after prepare_data + data setup (caches built)")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._print("after configure_model")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._print(f"after step {trainer.global_step}")


def toy_fit(tmp_path: Path, subject: Path, class_dir: Path, *overrides: str, steps: int):
    """A ``configs/demo.yaml`` fit on the toy model through the CLI, validating at step 0 and at the last step.

    Returns the CLI (its ``model`` is the trained module) and the validation rows of metrics.csv by step.
    """
    import csv

    from callbacks.run_dir import run_dir
    from train import cli_main

    cli = cli_main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "demo.yaml"),
            "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps),
            "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.callbacks=[]",
            "--export.enabled", "false",
            "--data.instance_data_dir", str(subject),
            "--data.class_data_dir", str(class_dir),
            *overrides,
        ]
    )  # fmt: skip
    with open(run_dir(cli.trainer) / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("val/dino")}
    return cli, rows


def demo_config() -> dict[str, Any]:
    """``configs/demo.yaml`` as a dict: the recipe the toy benchmarks fit (their steps and rates follow it)."""
    import yaml

    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def demo_steps() -> int:
    """``configs/demo.yaml``'s ``trainer.max_steps``: how long the demo trains."""
    return int(demo_config()["trainer"]["max_steps"])


def demo_rates(factor: float) -> tuple[str, str]:
    """CLI overrides setting the UNet's and the text encoder's learning rates to ``factor`` x ``configs/demo.yaml``'s
    (so "4x the demo's rates" follows the demo when its recipe changes)."""
    model = demo_config()["model"]
    return (
        f"--model.learning_rate={float(model['learning_rate']) * factor:.4g}",
        f"--model.text_encoder_lr={float(model['text_encoder_lr']) * factor:.4g}",
    )


def toy_bench_parser(doc: str | None, steps: int = 120, seeds: list[int] | None = None) -> argparse.ArgumentParser:
    """The toy benchmarks' shared options: ``--steps``, ``--seeds`` and ``--out`` (a markdown file for the report)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds or [0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    return parser


def write_report(
    title: str,
    script: str,
    argv: list[str] | None,
    start: float,
    lines: list[str],
    out: Path | None,
    machine_text: str | None = None,
) -> str:
    """A benchmark's markdown report: ``title``, the machine (``machine_text``, e.g. :func:`machine` taken at the
    start; by default taken now), date, wall time since ``start`` (``time.perf_counter``) and the command that reruns
    it, then ``lines``; printed, and written atomically to ``out`` when given."""
    args = argv if argv is not None else sys.argv[1:]
    command = f"OMP_NUM_THREADS=1 python {script} " + shlex.join(args)
    header = [
        f"# {title}",
        "",
        f"{machine_text or machine()}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s. "
        f"Command: `{command.strip()}`",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text, end="")
    if out is not None:
        from core.safe_files import atomic_write_text

        atomic_write_text(out, text)
    return text


def on_off_fits(
    tmp: Path,
    seeds: list[int],
    steps: int,
    subject: Callable[[bool], Path],
    overrides: Callable[[bool], list[str]] = lambda on: [],
) -> Iterator[tuple[bool, int, Any, dict]]:
    """The fits of an off / on comparison: for the feature off then on, ``subject(on)`` (the photo folder, drawn once
    per arm) trained with ``overrides(on)`` once per seed by :func:`toy_fit` in ``tmp``, the class images made by the
    first run and shared. Yields (on, seed, the CLI, its validation rows by step)."""
    class_dir = tmp / "class"
    for on in (False, True):
        folder = subject(on)
        for seed in seeds:
            cli, val = toy_fit(
                tmp / f"run_{on}_{seed}", folder, class_dir, f"--seed_everything={seed}", *overrides(on), steps=steps
            )
            yield on, seed, cli, val
