"""Device check: what only a GPU shows, in one script of at most 8 minutes on one H100 / H200 class GPU.

    python bench/device_check.py                 # on a GPU machine; writes bench/results/gpu_device_check_<gpu>.md
    python bench/device_check.py --smoke         # on a CPU: the same jobs, reduced (what tests/bench runs)
    python bench/device_check.py --only lora-bf16,predict   # some of the jobs

The CPU test suite cannot show CUDA mixed precision (bf16 autocast, fp16 with its gradient scaler), bitsandbytes'
8-bit AdamW on CUDA, NCCL, real GPU memory or GPU speed. Each job below is a real ``train.py`` run (LightningCLI, the
configs in ``configs/``) on the SD 1.5 architecture with random weights (``builtin:sd15-random``, built on first use,
about 1 minute and 4 GB; no download), in its own process with its own timeout, so that one hang or crash does not
take the others down. The jobs run in sequence; the script goes on after a failing job, writes the results file after
every job, and exits non-zero at the end, naming the jobs that failed.

Jobs (GPU mode; about 3-5 minutes of GPU work in all, plus the one-time build):

- ``lora-bf16``: ``configs/sd15_lora.yaml`` at 512 px in ``bf16-mixed``: UNet LoRA with prior preservation on cached
  latents and text, 16 steps, validation before training, at step 8 and at the end (2 prompts + the PRES prompt,
  2 images each, 10 sampler steps) scored with the toy DINO / CLIP encoders (``builtin:toy-dino``,
  ``builtin:toy-clip``; DIV with DINO), checkpoints and the LoRA export. Checks: the module, its trained weights
  (float32) and frozen weights (bfloat16) on the GPU; every validation's metric states, reference embeddings and
  held encoders on the GPU (the :class:`DeviceProbe` callback, at ``on_validation_end``), finite ``val/*`` metrics;
  finite losses and trained weights; the optimizer state on the GPU. Measures the peak GPU memory of the training
  steps and of rendering, and the step / UNet forward+backward ratio (``bench/train_step.py``'s measurement, in the
  configuration of the README's training-step ratio: LoRA + prior on caches, 512 px, bf16; 1.045 on an H100).
- ``lora-16-mixed``: the same config at 256 px in ``16-mixed`` (fp16 frozen weights, a ``GradScaler``, gradient
  clipping at 1.0), with text-encoder LoRA and gradient checkpointing; its 2 class images are generated first by the
  base model in fp16 (``data.class_images_batch_size: auto``). Checks as above, plus the scaler is in place with a
  finite scale.
- ``full-8bit-fused``: ``configs/sd15_dreambooth.yaml`` at 512 px in ``bf16-mixed``: full UNet fine-tuning with
  ``model.optimizer adamw8bit`` (bitsandbytes), gradient checkpointing and ``model.fused_backward true`` (one process,
  ``gradient_clip_val`` null: its constraints), 12 steps and a validation at the end. Checks as above, plus the
  optimizer steps inside backward (``OptimizerInBackward``) through bitsandbytes ``AdamW8bit`` optimizers whose
  state holds uint8 tensors on the GPU. Comparable with the README's "full UNet ... fused backward" row (6.16 GB).
- ``predict``: renders 2 prompts x 2 images at 512 px (10 steps) with the ``lora-bf16`` export
  (``model.lora_weights``; the base model with fresh adapters if that job failed); checks the PNGs and the contact
  sheet, and the peak GPU memory of rendering.
- ``test``: the DreamBench protocol on a DreamBench-layout folder of two toy subjects (an object and a dog: the
  object and live prompt lists), 2 prompts + the class prompt x 2 images each at 256 px, with the ``lora-bf16``
  export; checks the per-subject metric states on the GPU, ``eval/report.json`` with finite means.
- ``fsdp-1gpu``: ``configs/sd15_dreambooth.yaml`` composed with ``configs/strategies/fsdp_full.yaml`` as a user
  composes them (``DreamBoothFSDPStrategy``: units at the UNet's blocks, no norm clipping), on one GPU at 256 px in
  ``bf16-mixed``, full UNet with AdamW, 12 steps and a validation at the end, then the export gathered from FSDP's
  full state dict. Checks: the module on the GPU, finite losses, trained weights and ``val/*``; the export's UNet
  written, whole (no empty shards) and finite. Skipped in ``--smoke`` (FSDP needs CUDA here).
- ``ddp-2gpu`` (two or more GPUs; skipped with a note on one): ``lora-bf16`` at 256 px on 2 GPUs through DDP: NCCL
  as the process group's backend, validation prompts spread over the ranks, metric states on each rank's GPU, the
  synchronized ``val/*`` metrics equal on both ranks.
- ``sdxl-lora-1024``: ``configs/sdxl_lora.yaml`` on ``builtin:sdxl-random`` (the real SDXL base architecture with
  random weights, built before the job on first use: 14 GB in float32, no download) at 1024 px in ``bf16-mixed``:
  UNet LoRA (rank 32) with prior preservation, frozen weights in bf16, latents and both encoders' text embeddings
  cached, gradient checkpointing, one image + one class image per step, 8 steps, 8-bit AdamW when bitsandbytes is
  importable; no validation, checkpoints or export. Checks as above (no validation) plus the memory target of issue
  12: the training steps' peak GPU memory allocated at most 12 GB (``SDXL_TARGET_GB``), reserved reported beside it.
  It runs last; after the others the 450 s budget may be spent (the model build is not quick), so run it on its own:
  ``--only sdxl-lora-1024`` builds and runs only this (the SD 1.5 model is then not built); its timeout is 170 s.

Budget: jobs start only while less than ``--budget-s`` (450) seconds have passed since the script started, model
build included, and each job's timeout (120-180 s, ``--timeout-scale``) is cut to what is left, so the script ends
within 8 minutes; a job that runs out of time is killed with its process group and reported as ``TIMEOUT``.
``--job-arg JOB=ARG`` appends a CLI argument to one job.

``--smoke`` runs the same jobs on the CPU with ``builtin:tiny-sd`` (``builtin:tiny-sdxl`` for the SDXL job, with
AdamW and no memory target) at 64 px, 2-3 steps and 2 sampler steps, the tiny
or toy metric encoders, ``bf16-mixed`` for ``lora-bf16`` and ``full-8bit-fused`` and ``32-true`` for the others
(bf16 is slow on a CPU without bf16 instructions; fp16 autocast and its scaler are CUDA's), one torch thread
(``--threads``), ``adamw8bit`` when the installed bitsandbytes runs it on the CPU (tried first; 0.50 does; ``adamw``
otherwise, with a note); the DDP job is skipped (``tests/test_ddp.py`` covers DDP on the CPU with gloo), and so is the
FSDP job. The same
checks run, against the CPU. ``tests/bench/test_device_check.py`` runs it (about 20 s) so that this script does not
rot.

Output: a markdown file (``--out``; default ``bench/results/gpu_device_check_<gpu>.md``, or
``bench/results/cpu_device_check_smoke.md`` with ``--smoke``) with the machine, GPU, torch / CUDA / library versions,
the date, a row per job (status, precision, peak GPU memory allocated in training and in rendering, step time, UNet
forward+backward time, ratio, wall time) and a table of checks per job; failed jobs get the tail of their log. Commit
the GPU results file next to the other ``bench/results/gpu_*.md``. Peak GPU memory is
``torch.cuda.max_memory_allocated`` in the job's own process, reset before the training steps, before each
validation and before rendering; the training peak is read right after each step, before the UNet reference runs
(whose own backward allocates gradients that fused backward never holds).

``--runner in-process`` runs the jobs through ``train.cli_main`` in this process instead (no timeouts then; the DDP
job always runs as a process): the CPU test uses it, being faster to start.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, make_data, median  # noqa: E402
from bench.train_step import UNetReference, _sync  # noqa: E402

GB = 1e9
VALIDATION_PROMPTS = ["a {identifier} {class_noun} on the beach", "a red {identifier} {class_noun}"]
PREDICT_PROMPTS = ["a photo of {identifier} {class_noun}", "a {identifier} {class_noun} in the snow"]
DREAMBENCH_TABLE = """Classes

subject_name,class
red_ball,ball
blue_dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""

# The checks DeviceProbe records (name -> what it asserts). A job lists those it requires; a missing one fails it.
CHECK_DEVICE = "module on the expected device"
CHECK_DTYPES = "trained weights float32, frozen weights in the compute dtype"
CHECK_LOSS = "losses finite"
CHECK_WEIGHTS = "trained weights finite after training"
CHECK_OPTIMIZER = "optimizer as configured, its state on the device"
CHECK_8BIT = "8-bit optimizer state (uint8) on the device"
CHECK_FUSED = "optimizer fused into backward"
CHECK_SCALER = "fp16 gradient scaler in place, finite scale"
CHECK_VAL_METRICS = "metric states, reference embeddings and encoders on the device at validation end"
CHECK_VAL_FINITE = "val/* metrics finite"
CHECK_TEST_METRICS = "DreamBench metric states and encoders on the device at test end"
CHECK_TEST_REPORT = "DreamBench report with finite means"
CHECK_RENDERED = "images rendered"
CHECK_BACKEND = "process group backend"
CHECK_TIMING = "step and UNet forward+backward timed"


# --------------------------------------------------------------------------------------------- the probe (in the job)
class DeviceProbe(UNetReference):
    """Asserts where things live and measures memory and speed inside a ``train.py`` run; writes what it found to
    ``out`` (JSON; ranks other than 0 add ``.rank<N>``) at teardown, or when the run raises.

    Training: the step / UNet forward+backward times of :class:`bench.train_step.UNetReference` (with ``reference``;
    otherwise the step time only, as under DDP, where a backward outside DDP's forward would confuse its reducer), the
    peak GPU memory of the steps (read before the reference runs), finite losses, the dtypes and devices of the
    weights, the optimizer and its state. Validation: the metric states, reference embeddings and held encoders of
    :class:`callbacks.metrics.SubjectMetrics` on the module's device, and finite ``val/*`` values. ``test``: the same
    for :class:`callbacks.evaluation.DreamBenchEvaluation`'s per-subject scorers, and its report. ``predict``: the
    number of images and the rendering time.

    Args:
        out: The JSON file to write.
        expect_device: ``cuda`` or ``cpu``: the device type the module must be on.
        reference: Time the UNet forward + backward after each step (``bench/train_step.py``'s measurement).
        warmup: Steps left out of the timing at the start, after the first (which is never timed).
    """

    def __init__(self, out: str, expect_device: str = "cuda", reference: bool = True, warmup: int = 3) -> None:
        super().__init__(warmup)
        self.out, self.expect_device, self.reference = out, expect_device, reference
        self.result: dict[str, Any] = {"checks": {}, "peak_allocated": {}, "peak_reserved": {}, "stages": []}
        self._losses_finite = True
        self._t0 = 0.0
        self._images = 0

    # -- helpers
    def _check(self, name: str, ok: bool, detail: str = "") -> None:
        """Record a check; a check made several times (each validation) fails if any time failed."""
        old = self.result["checks"].get(name)
        if old is not None and not old["ok"]:
            return
        self.result["checks"][name] = {"ok": bool(ok), "detail": detail}

    @staticmethod
    def _on_cuda(pl_module: pl.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def _read_peak(self, pl_module: pl.LightningModule, phase: str, reset: bool = True) -> None:
        if not self._on_cuda(pl_module):
            return
        torch.cuda.synchronize()
        for key, value in (
            ("peak_allocated", torch.cuda.max_memory_allocated()),
            ("peak_reserved", torch.cuda.max_memory_reserved()),
        ):
            self.result[key][phase] = max(self.result[key].get(phase, 0), value)
        if reset:
            torch.cuda.reset_peak_memory_stats()

    def _reset_peak(self, pl_module: pl.LightningModule) -> None:
        if self._on_cuda(pl_module):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _write(self) -> None:
        path = Path(self.out)
        rank = self.result.get("rank", 0)
        if rank:
            path = path.with_name(f"{path.name}.rank{rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.result, indent=2, default=str))

    # -- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.result["stages"].append(stage)
        self.result["rank"] = trainer.global_rank
        self.result["world_size"] = trainer.world_size
        self.result["precision"] = str(trainer.precision)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _check_device(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self.result["device"] = str(device)
        if device.type == "cuda":
            self.result["gpu"] = torch.cuda.get_device_name(device)
        self._check(CHECK_DEVICE, device.type == self.expect_device, f"{device} (expected {self.expect_device})")
        try:
            from callbacks.run_dir import run_dir

            self.result["run_dir"] = str(run_dir(trainer))
        except Exception as err:  # a run without a logger still works; record why
            self.result["run_dir_error"] = repr(err)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = str(torch.distributed.get_backend())
            self.result["backend"] = backend
            want = "nccl" if self.expect_device == "cuda" else "gloo"
            self._check(CHECK_BACKEND, backend == want, f"{backend} (expected {want})")

    # -- training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_device(trainer, pl_module)
        from lightning_modules.dreambooth import FROZEN_DTYPES

        want_frozen = FROZEN_DTYPES.get(str(trainer.precision), torch.float32)
        trained, frozen, wrong_device = set(), set(), set()
        for name, p in pl_module.named_parameters():
            (trained if p.requires_grad else frozen).add(p.dtype)
            if p.device != pl_module.device:
                wrong_device.add(name.split(".")[0])
        ok = trained == {torch.float32} and frozen <= {want_frozen} and not wrong_device
        detail = f"trained {_names(trained)}, frozen {_names(frozen) or 'none held'} (expected {want_frozen})"
        self._check(CHECK_DTYPES, ok, detail + (f"; off the device: {sorted(wrong_device)}" if wrong_device else ""))
        plugin = trainer.precision_plugin
        if str(trainer.precision) == "16-mixed":
            scaler = getattr(plugin, "scaler", None)
            self._check(CHECK_SCALER, scaler is not None, type(scaler).__name__)
        self._reset_peak(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            self._losses_finite = False
        self._read_peak(pl_module, "train", reset=False)  # the step's peak, before the reference allocates
        if self.reference:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:
            _sync(pl_module)
            now = time.perf_counter()
            if self._last is not None:
                self.step_times.append(now - self._last)
            self._last = now
        self._reset_peak(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = self.step_times[self.warmup :]
        unet = self.unet_times[self.warmup + 1 :] if self.reference else []
        self.result.update(step_s=median(steps), unet_s=median(unet), steps_timed=len(steps))
        self.result.update(step_times=self.step_times, unet_times=self.unet_times)  # all, warm-up included
        timed = bool(steps) and (bool(unet) or not self.reference)
        self._check(CHECK_TIMING, timed, f"{len(steps)} steps timed after {self.warmup} warm-up")
        self._check(CHECK_LOSS, self._losses_finite, f"{trainer.global_step} optimizer steps")
        bad = [n for n, p in pl_module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        self._check(CHECK_WEIGHTS, not bad, f"not finite: {bad[:3]}" if bad else "")
        self._check_optimizer(trainer, pl_module)
        if str(trainer.precision) == "16-mixed":
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None else float("nan")
            self._check(CHECK_SCALER, scaler is not None and math.isfinite(scale) and scale > 0, f"scale {scale:g}")

    def _check_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_modules.fused_optim import OptimizerInBackward

        hp = pl_module.hparams
        optimizer = trainer.optimizers[0]
        fused = isinstance(optimizer, OptimizerInBackward)
        inner = list(optimizer._inner.values()) if fused else [optimizer]
        if hp.get("fused_backward"):
            self._check(CHECK_FUSED, fused, f"{type(optimizer).__name__} over {len(inner)} per-parameter optimizers")
        kinds = sorted({f"{type(o).__module__.split('.')[0]}.{type(o).__name__}" for o in inner})
        # torch's AdamW keeps each parameter's step count, a scalar, on the CPU (unless capturable or fused): not state
        # that should move with the weights.
        states = [
            t
            for o in inner
            for s in o.state.values()
            for k, t in s.items()
            if isinstance(t, torch.Tensor) and k != "step"
        ]
        off = sorted({str(t.device) for t in states if t.device != pl_module.device})
        want = "bitsandbytes.AdamW8bit" if hp.get("optimizer") == "adamw8bit" else "torch.AdamW"
        ok = kinds == [want] and bool(states) and not off
        self._check(CHECK_OPTIMIZER, ok, f"{', '.join(kinds)}; {len(states)} state tensors, off the device: {off}")
        if hp.get("optimizer") == "adamw8bit":
            uint8 = [t for t in states if t.dtype == torch.uint8]
            self._check(
                CHECK_8BIT,
                bool(uint8) and all(t.device == pl_module.device for t in uint8),
                f"{len(uint8)} uint8 state tensors of {len(states)}",
            )

    # -- validation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "device" not in self.result:
            self._check_device(trainer, pl_module)
        self._reset_peak(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from callbacks.metrics import SubjectMetrics

        self._read_peak(pl_module, "render")
        self.result["validations"] = self.result.get("validations", 0) + 1
        scorer = next((c.scorer for c in trainer.callbacks if isinstance(c, SubjectMetrics)), None)
        if scorer is None:
            self._check(CHECK_VAL_METRICS, False, "no SubjectMetrics scorer (metrics.enabled false?)")
        else:
            problems, counts = _metric_problems(scorer.metrics, pl_module.device, trainer.world_size == 1)
            self._check(CHECK_VAL_METRICS, not problems, "; ".join(problems) or f"{pl_module.device}; updates {counts}")
        if not trainer.sanity_checking:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.result["val_metrics"] = values
            ok = bool(values) and all(math.isfinite(v) for v in values.values())
            self._check(CHECK_VAL_FINITE, ok, ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))
        if self._last is not None:  # the next step is timed from here: rendering is not part of a training step
            _sync(pl_module)
            self._last = time.perf_counter()

    # -- test and predict
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_device(trainer, pl_module)
        self._reset_peak(pl_module)
        self._t0, self._images = time.perf_counter(), 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._images += len(outputs["images"]) if outputs else 0

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from callbacks.evaluation import DreamBenchEvaluation

        self._rendered(pl_module)
        evaluation = next((c for c in trainer.callbacks if isinstance(c, DreamBenchEvaluation)), None)
        scorers = evaluation.scorers if evaluation is not None else []
        problems: list[str] = []
        for i, scorer in enumerate(scorers):
            got, _ = _metric_problems(scorer.metrics, pl_module.device, trainer.world_size == 1)
            problems += [f"subject {i}: {p}" for p in got]
        if not scorers:
            problems.append("no DreamBenchEvaluation scorers (evaluation.enabled false?)")
        self._check(CHECK_TEST_METRICS, not problems, "; ".join(problems) or f"{len(scorers)} subjects")
        if trainer.is_global_zero:
            report = evaluation.report if evaluation is not None else None
            mean = (report or {}).get("mean", {})
            self.result["test_metrics"] = mean
            ok = bool(mean) and all(v is not None and math.isfinite(v) for v in mean.values())
            self._check(CHECK_TEST_REPORT, ok, ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if v is not None))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_device(trainer, pl_module)
        self._reset_peak(pl_module)
        self._t0, self._images = time.perf_counter(), 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._images += len(outputs["images"]) if outputs else 0

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rendered(pl_module)

    def _rendered(self, pl_module: pl.LightningModule) -> None:
        self._read_peak(pl_module, "render")
        seconds = time.perf_counter() - self._t0
        self.result.update(images=self._images, render_s=seconds)
        self._check(CHECK_RENDERED, self._images > 0, f"{self._images} images in {seconds:.1f} s")

    # -- the end
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._write()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.result["exception"] = f"{type(exception).__name__}: {exception}"
        self._write()


def _names(dtypes: set[torch.dtype]) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _metric_problems(metrics: dict, device: torch.device, all_updated: bool) -> tuple[list[str], dict[str, int]]:
    """Where the torchmetrics states, buffers and held encoders of ``metrics`` are not on ``device``; and whether they
    were updated (every one in a single process; at least one under DDP, where a rank may get no class prompt)."""
    problems, counts = [], {}
    for name, metric in metrics.items():
        counts[name] = metric.update_count
        tensors: list[tuple[str, torch.Tensor]] = []
        for key, state in metric.metric_state.items():
            tensors += [(key, t) for t in (state if isinstance(state, list) else [state])]
        tensors += list(metric.named_buffers())
        for held in getattr(metric, "_held_names", ()):
            module = getattr(metric, held)
            tensors += [(f"{held}.{k}", t) for k, t in [*module.named_parameters(), *module.named_buffers()]]
        off = sorted({f"{key} on {t.device}" for key, t in tensors if t.device != device})
        if off:
            problems.append(f"{name}: {', '.join(off[:3])}")
        if metric.device != device:
            problems.append(f"{name}: metric.device {metric.device}")
    if (all_updated and not all(counts.values())) or not any(counts.values()):
        problems.append(f"not updated: {counts}")
    return problems, counts


# --------------------------------------------------------------------------------------------- the jobs (the parent)
@dataclass
class Context:
    smoke: bool
    accelerator: str
    expect_device: str
    model: str
    workdir: Path
    instance: Path
    class_dir: Path
    dreambench: Path
    runner: str
    threads: int | None = None  # torch's CPU threads in the jobs (None: torch's default)
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # job name -> CLI arguments appended
    notes: list[str] = field(default_factory=list)
    optimizer_8bit: str = "adamw8bit"
    results: dict[str, dict] = field(default_factory=dict)  # job name -> probe result


@dataclass
class Job:
    name: str
    what: str
    precision: str
    resolution: int
    timeout_s: float
    make_args: Callable[[Context, Job], list[str]]
    required: tuple[str, ...]
    validations: int = 0  # validation runs expected (sanity check included)
    devices: int = 1
    skip: str | None = None  # why it does not run here
    model: str | None = None  # the base model when not the context's (built before the job runs)


def _probe(ctx: Context, job: Job, **init_args: Any) -> str:
    args = {"out": str(ctx.workdir / "results" / f"{job.name}.json"), "expect_device": ctx.expect_device}
    args["warmup"] = 0 if ctx.smoke else 3  # the first step is never timed: 0 leaves the rest
    return json.dumps({"class_path": "bench.device_check.DeviceProbe", "init_args": {**args, **init_args}})


def _sizes(ctx: Context) -> dict[str, int]:
    """Steps, sampler steps and validation interval of the fits: full size on a GPU, a few on the CPU."""
    if ctx.smoke:
        return {"steps": 3, "interval": 2, "steps_short": 2, "sampler": 2, "class_images": 2, "eval_prompts": 1,
                "steps_sdxl": 2}  # fmt: skip
    return {"steps": 16, "interval": 8, "steps_short": 12, "sampler": 10, "class_images": 2, "eval_prompts": 2,
            "steps_sdxl": 8}  # fmt: skip


def _config_with_csv_logger(ctx: Context, config: str) -> Path:
    """``configs/<config>`` with its logger replaced by a CSV logger, written once into the work folder. The jobs log
    to CSV anyway; a config naming W&B's logger would not even parse where ``wandb`` is not installed (jsonargparse
    reads the logger's options from ``wandb.init``), as on a bare GPU image."""
    import yaml

    path = ctx.workdir / "configs" / config
    if not path.is_file():
        settings = yaml.safe_load((ROOT / "configs" / config).read_text())
        settings.setdefault("trainer", {})["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger"}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(settings))
    return path


def _common(ctx: Context, job: Job, config: str, subcommand: str) -> list[str]:
    run = ctx.workdir / "runs" / job.name
    dino, clip = ("builtin:toy-dino", "builtin:toy-clip") if job.name.startswith("lora-bf16") else (
        "builtin:tiny-dino", "builtin:tiny-clip")  # fmt: skip
    return [
        subcommand, "--config", str(_config_with_csv_logger(ctx, config)),
        "--model.pretrained_model_name_or_path", ctx.model,
        f"--trainer.accelerator={ctx.accelerator}", f"--trainer.devices={job.devices}",
        f"--trainer.precision={job.precision}",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run),
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.instance_data_dir", str(ctx.instance), f"--data.resolution={job.resolution}",
        "--data.instance_prompt", "a photo of sks ball", "--data.class_prompt", "a photo of ball",
        "--data.class_noun=ball", "--data.cache_dir", str(ctx.workdir / "cache"),
        f"--data.num_workers={0 if ctx.smoke else 2}",
        f"--data.validation_prompts={json.dumps(VALIDATION_PROMPTS)}", "--data.validation_batch_size=4",
        f"--model.sampling.num_inference_steps={_sizes(ctx)['sampler']}", "--model.sampling.num_images_per_prompt=2",
        f"--metrics.dino_model={dino}", f"--metrics.clip_model={clip}", "--metrics.clip_pretrained=null",
        "--metrics.div=true", "--metrics.div_distance=dino",
    ]  # fmt: skip


def _lora_bf16_args(ctx: Context, job: Job) -> list[str]:
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sd15_lora.yaml", "fit"),
        "--model.train_text_encoder=false", "--model.gradient_checkpointing=false",
        f"--trainer.max_steps={s['steps']}", f"--trainer.val_check_interval={s['interval']}",
        "--trainer.num_sanity_val_steps=-1",
        "--data.class_data_dir", str(ctx.class_dir), "--data.num_class_images=4",
        f"--trainer.callbacks+={_probe(ctx, job)}",
    ]  # fmt: skip


def _lora_fp16_args(ctx: Context, job: Job) -> list[str]:
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sd15_lora.yaml", "fit"),
        "--model.train_text_encoder=true", "--model.gradient_checkpointing=true", "--trainer.gradient_clip_val=1.0",
        f"--trainer.max_steps={s['steps_short']}", f"--trainer.val_check_interval={s['steps_short']}",
        "--trainer.num_sanity_val_steps=0",
        "--data.class_data_dir", str(ctx.workdir / "generated_class_images"),
        f"--data.num_class_images={s['class_images']}", "--data.class_images_batch_size=auto",
        f"--data.class_images_inference_steps={s['sampler']}",
        f"--trainer.callbacks+={_probe(ctx, job)}",
    ]  # fmt: skip


def _full_args(ctx: Context, job: Job) -> list[str]:
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sd15_dreambooth.yaml", "fit"),
        "--model.train_text_encoder=false", f"--model.optimizer={ctx.optimizer_8bit}",
        "--model.gradient_checkpointing=true", "--model.fused_backward=true", "--trainer.gradient_clip_val=null",
        f"--trainer.max_steps={s['steps_short']}", f"--trainer.val_check_interval={s['steps_short']}",
        "--trainer.num_sanity_val_steps=0",
        "--data.class_data_dir", str(ctx.class_dir), "--data.num_class_images=4",
        # No checkpoints or export: a full fine-tune's are gigabytes and show nothing about the GPU.
        "--trainer.enable_checkpointing=false", "--export.enabled=false",
        f"--trainer.callbacks=[{_probe(ctx, job)}]",
    ]  # fmt: skip


def _fsdp_args(ctx: Context, job: Job) -> list[str]:
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sd15_dreambooth.yaml", "fit"),
        "--config", str(ROOT / "configs" / "strategies" / "fsdp_full.yaml"),  # as a user composes it
        f"--trainer.accelerator={ctx.accelerator}", f"--trainer.devices={job.devices}",
        f"--trainer.precision={job.precision}",
        "--model.train_text_encoder=false", "--model.fused_backward=false", "--model.gradient_checkpointing=true",
        f"--trainer.max_steps={s['steps_short']}", f"--trainer.val_check_interval={s['steps_short']}",
        "--trainer.num_sanity_val_steps=0",
        "--data.class_data_dir", str(ctx.class_dir), "--data.num_class_images=4",
        # The export is what FSDP gathers from the shards: written (the diffusers folder only), and checked.
        "--trainer.enable_checkpointing=false", "--export.enabled=true", "--export.single_file=false",
        f"--trainer.callbacks=[{_probe(ctx, job)}]",
    ]  # fmt: skip


def _lora_export(ctx: Context, job: Job) -> list[str]:
    """``model.lora_weights`` from the ``lora-bf16`` job's export, when it made one."""
    run = ctx.results.get("lora-bf16", {}).get("run_dir")
    export = Path(run) / "export" if run else None
    if export is not None and (export / "pytorch_lora_weights.safetensors").is_file():
        return [f"--model.lora_weights={export}"]
    ctx.notes.append(f"{job.name}: no lora-bf16 export; rendered with the base model and fresh adapters")
    return []


def _predict_args(ctx: Context, job: Job) -> list[str]:
    return [
        *_common(ctx, job, "sd15_lora.yaml", "predict"), "--model.train_text_encoder=false",
        "--data.class_data_dir", str(ctx.workdir / "no_class_images_needed"),
        f"--data.predict_prompts={json.dumps(PREDICT_PROMPTS)}", "--data.predict_seed=0",
        f"--render.dirpath={ctx.workdir / 'predict'}",
        *_lora_export(ctx, job),
        f"--trainer.callbacks+={_probe(ctx, job)}",
    ]  # fmt: skip


def _test_args(ctx: Context, job: Job) -> list[str]:
    return [
        *_common(ctx, job, "sd15_lora.yaml", "test"), "--model.train_text_encoder=false",
        "--data.class_data_dir", str(ctx.workdir / "no_class_images_needed"),
        f"--data.eval_data_dir={ctx.dreambench}", f"--data.eval_num_prompts={_sizes(ctx)['eval_prompts']}",
        "--data.eval_num_images=2",
        *_lora_export(ctx, job),
        f"--trainer.callbacks+={_probe(ctx, job)}",
    ]  # fmt: skip


def _ddp_args(ctx: Context, job: Job) -> list[str]:
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sd15_lora.yaml", "fit"),
        "--trainer.strategy=ddp", "--model.train_text_encoder=false",
        f"--trainer.max_steps={s['steps_short']}", f"--trainer.val_check_interval={s['steps_short']}",
        "--trainer.num_sanity_val_steps=-1",
        "--data.class_data_dir", str(ctx.class_dir), "--data.num_class_images=4",
        "--export.enabled=false", "--trainer.enable_checkpointing=false",
        f"--trainer.callbacks=[{_probe(ctx, job, reference=False)}]",
    ]  # fmt: skip


SDXL_TARGET_GB = 12.0  # issue 12: SDXL LoRA at 1024 px with caches and gradient checkpointing trains on a 12 GB card
CHECK_SDXL_MEMORY = f"peak GPU memory of the training steps <= {SDXL_TARGET_GB:g} GB (SDXL LoRA 1024 px target)"


def _sdxl_lora_args(ctx: Context, job: Job) -> list[str]:
    """``configs/sdxl_lora.yaml`` on ``builtin:sdxl-random`` as its users run it, for the memory target: UNet LoRA with
    prior preservation, frozen weights in bf16, latents and text embeddings of both encoders cached (no VAE or text
    encoder during the steps), gradient checkpointing, one image + one class image per step, no accumulation; 8-bit
    AdamW where bitsandbytes runs it. No validation, checkpoints or export (SDXL renders at 1024 px cost minutes and
    show nothing about the training peak)."""
    s = _sizes(ctx)
    return [
        *_common(ctx, job, "sdxl_lora.yaml", "fit"),
        "--model.pretrained_model_name_or_path", job.model or ctx.model,
        "--model.vae=null",  # the config's fp16-fix VAE is a download; SDXL's own VAE (float32) encodes the cache
        "--model.train_text_encoder=false", "--model.gradient_checkpointing=true",
        f"--model.optimizer={_sdxl_optimizer(ctx)}",
        "--data.cache_latents=true",  # the text-embedding cache follows from train_text_encoder false
        "--trainer.accumulate_grad_batches=1", f"--trainer.max_steps={s['steps_sdxl']}",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false",
        "--data.class_data_dir", str(ctx.class_dir), "--data.num_class_images=4",
        "--trainer.enable_checkpointing=false", "--export.enabled=false",
        f"--trainer.callbacks=[{_probe(ctx, job, reference=False)}]",
    ]  # fmt: skip


def _sdxl_optimizer(ctx: Context) -> str:
    """On a GPU, 8-bit AdamW when bitsandbytes is importable, else AdamW. In smoke mode AdamW: ``tiny-sdxl``'s adapters
    are all below bitsandbytes' 4096-value minimum for 8-bit state (the ``full-8bit-fused`` job covers 8-bit AdamW)."""
    import importlib.util

    return "adamw8bit" if not ctx.smoke and importlib.util.find_spec("bitsandbytes") is not None else "adamw"


def sdxl_memory_check(result: dict, target_gb: float = SDXL_TARGET_GB) -> dict:
    """The memory target of the SDXL job: the training steps' peak of ``torch.cuda.max_memory_allocated`` at most
    ``target_gb`` (what the tensors held; the allocator's reserved peak is reported beside it)."""
    allocated = result.get("peak_allocated", {}).get("train")
    reserved = result.get("peak_reserved", {}).get("train")
    if not allocated:
        return {"ok": False, "detail": "no GPU peak measured"}
    detail = f"allocated {allocated / GB:.2f} GB, reserved {(reserved or 0) / GB:.2f} GB (target {target_gb:g} GB)"
    return {"ok": allocated <= target_gb * GB, "detail": detail}


FIT_CHECKS = (CHECK_DEVICE, CHECK_DTYPES, CHECK_LOSS, CHECK_WEIGHTS, CHECK_OPTIMIZER, CHECK_VAL_METRICS,
              CHECK_VAL_FINITE, CHECK_TIMING)  # fmt: skip


def make_jobs(ctx: Context, gpus: int) -> list[Job]:
    smoke = ctx.smoke
    lo, hi = (64, 64) if smoke else (256, 512)

    def precision(gpu: str, cpu: str = "32-true") -> str:
        """On the CPU mostly 32-true: bf16 is slow on a CPU without bf16 instructions; fp16 autocast and its scaler
        are CUDA's."""
        return cpu if smoke else gpu

    full_checks = (*FIT_CHECKS, CHECK_FUSED) + ((CHECK_8BIT,) if ctx.optimizer_8bit == "adamw8bit" else ())
    ddp_skip = None
    if smoke:
        ddp_skip = "CPU smoke mode (tests/test_ddp.py runs DDP on the CPU with gloo)"
    elif gpus < 2:
        ddp_skip = f"{gpus} GPU on this machine; NCCL needs two"
    fsdp_skip = "CPU smoke mode (FSDP needs CUDA here)" if smoke else None
    sdxl_checks = (CHECK_DEVICE, CHECK_DTYPES, CHECK_LOSS, CHECK_WEIGHTS, CHECK_OPTIMIZER, CHECK_TIMING)
    sdxl_checks += () if smoke else (CHECK_SDXL_MEMORY,)
    sdxl_checks += (CHECK_8BIT,) if _sdxl_optimizer(ctx) == "adamw8bit" else ()
    return [
        Job("lora-bf16", "sd15_lora.yaml, UNet LoRA + prior, cached latents/text, 3 validations, toy encoders, export",
            "bf16-mixed", hi, 180, _lora_bf16_args, FIT_CHECKS, validations=3),
        Job("lora-16-mixed", "sd15_lora.yaml, UNet + text-encoder LoRA, grad. ckpt, clip 1.0, class images generated",
            precision("16-mixed"), lo, 150, _lora_fp16_args, FIT_CHECKS + (() if smoke else (CHECK_SCALER,)),
            validations=1),
        Job("full-8bit-fused", f"sd15_dreambooth.yaml, full UNet, {ctx.optimizer_8bit}, grad. ckpt, fused backward",
            precision("bf16-mixed", "bf16-mixed"), hi, 180, _full_args, full_checks, validations=1),
        Job("predict", "2 prompts x 2 images with the lora-bf16 export, PNGs + contact sheet",
            precision("bf16-mixed"), hi, 120, _predict_args, (CHECK_DEVICE, CHECK_RENDERED)),
        Job("test", "DreamBench protocol, 2 toy subjects (object + live), 2 images per prompt, lora-bf16 export",
            precision("bf16-mixed"), lo, 120, _test_args,
            (CHECK_DEVICE, CHECK_RENDERED, CHECK_TEST_METRICS, CHECK_TEST_REPORT)),
        Job("fsdp-1gpu", "sd15_dreambooth.yaml + strategies/fsdp_full.yaml on 1 GPU, full UNet, gathered export",
            "bf16-mixed", lo, 180, _fsdp_args, (CHECK_DEVICE, CHECK_LOSS, CHECK_WEIGHTS, CHECK_VAL_FINITE),
            validations=1, skip=fsdp_skip),
        Job("ddp-2gpu", "sd15_lora.yaml on 2 GPUs (DDP, NCCL), validation prompts spread, metrics synchronized",
            "bf16-mixed", lo, 180, _ddp_args, (*FIT_CHECKS, CHECK_BACKEND), validations=2, devices=2, skip=ddp_skip),
        Job("sdxl-lora-1024", "sdxl_lora.yaml on builtin:sdxl-random, UNet LoRA + prior, bf16 frozen weights, cached "
            f"latents/text, grad. ckpt, {_sdxl_optimizer(ctx)}; peak GPU memory against the 12 GB target",
            "bf16-mixed", 64 if smoke else 1024, 170, _sdxl_lora_args, sdxl_checks,
            model="builtin:tiny-sdxl" if smoke else "builtin:sdxl-random"),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- running one job
@dataclass
class Outcome:
    status: str  # ok, FAILED, TIMEOUT, skipped
    wall_s: float = 0.0
    result: dict = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    log_tail: str = ""
    peak_rss: float | None = None


def _run_subprocess(
    args: list[str], log: Path, timeout_s: float, threads: int | None
) -> tuple[int | None, float | None]:
    """Run ``python train.py <args>`` in its own process group; kill the group at the timeout. Returns (exit status
    or None on timeout, peak RSS of the main process in bytes)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        rc: int | None = None
        usage = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                _kill_group(proc.pid)
                _, _, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        proc.returncode = -9 if rc is None else rc  # reaped above: keep Popen from waiting again
        _kill_group(proc.pid)  # what the job left behind (a DDP rank, data-loader workers)
    return rc, (usage.ru_maxrss * 1024 if usage is not None else None)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_in_process(args: list[str], log: Path, threads: int | None) -> int:
    from train import cli_main

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():  # this process's own argv is not for the CLI: the warning about it is noise
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli_main(args)
        return 0
    except (Exception, SystemExit) as err:
        log.write_text(traceback.format_exc())
        return err.code if isinstance(err, SystemExit) and isinstance(err.code, int) and err.code else 1
    finally:
        torch.set_num_threads(threads_before)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_job(ctx: Context, job: Job, timeout_s: float) -> Outcome:
    if job.skip:
        return Outcome("skipped")
    log = ctx.workdir / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result_file = ctx.workdir / "results" / f"{job.name}.json"
    start = time.perf_counter()
    try:
        args = [*job.make_args(ctx, job), *ctx.extra_args.get(job.name, [])]
    except Exception:
        return Outcome("FAILED", log_tail=traceback.format_exc())
    (ctx.workdir / "logs" / f"{job.name}.args.json").write_text(json.dumps(args, indent=1))
    peak_rss = None
    if ctx.runner == "subprocess" or job.devices > 1:
        rc, peak_rss = _run_subprocess(args, log, timeout_s, ctx.threads)
    else:
        rc = _run_in_process(args, log, ctx.threads)
    wall = time.perf_counter() - start
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    ctx.results[job.name] = result
    checks = dict(result.get("checks", {}))
    checks["exit status 0"] = {"ok": rc == 0, "detail": "killed at the timeout" if rc is None else f"exit {rc}"}
    for name in job.required:
        checks.setdefault(name, {"ok": False, "detail": "not reached"})
    if job.validations:
        got = result.get("validations", 0)
        checks["validations run"] = {"ok": got >= job.validations, "detail": f"{got} (expected {job.validations})"}
    _job_specific_checks(ctx, job, result, checks)
    ok = rc == 0 and all(c["ok"] for c in checks.values())
    status = "ok" if ok else ("TIMEOUT" if rc is None else "FAILED")
    tail = "" if ok else "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.is_file() else ""
    return Outcome(status, wall, result, checks, tail, peak_rss)


def _job_specific_checks(ctx: Context, job: Job, result: dict, checks: dict[str, dict]) -> None:
    run = Path(result["run_dir"]) if result.get("run_dir") else None
    if job.name == "lora-bf16":
        export = run / "export" / "pytorch_lora_weights.safetensors" if run else None
        checks["LoRA export written"] = {"ok": bool(export and export.is_file()), "detail": str(export)}
    if job.name == "predict":
        folder = ctx.workdir / "predict"
        pngs = [p for p in folder.glob("*.png") if p.name != "contact_sheet.png"]
        want = len(PREDICT_PROMPTS) * 2
        ok = len(pngs) == want and (folder / "contact_sheet.png").is_file()
        checks["PNGs and contact sheet written"] = {"ok": ok, "detail": f"{len(pngs)} PNGs (expected {want})"}
    if job.name == "fsdp-1gpu":
        unet = run / "export" / "pipeline" / "unet" if run else None
        weights = sorted(unet.glob("*.safetensors")) if unet and unet.is_dir() else []
        checks["full export gathered from FSDP and written"] = {"ok": bool(weights), "detail": str(unet)}
        if weights:
            from safetensors.torch import load_file

            tensors = [t for w in weights for t in load_file(w).values()]
            ok = all(t.numel() > 0 and bool(t.float().isfinite().all()) for t in tensors)
            sizes = sum(t.numel() for t in tensors)
            checks["export: whole, finite tensors (no shards)"] = {"ok": ok, "detail": f"{sizes} values"}
    if job.name == "sdxl-lora-1024" and not ctx.smoke:
        checks[CHECK_SDXL_MEMORY] = sdxl_memory_check(result)
    if job.name == "test":
        report = run / "eval" / "report.json" if run else None
        checks["eval/report.json written"] = {"ok": bool(report and report.is_file()), "detail": str(report)}
    if job.devices > 1:
        rank1_file = ctx.workdir / "results" / f"{job.name}.json.rank1"
        other = json.loads(rank1_file.read_text()) if rank1_file.is_file() else {}
        for name, check in other.get("checks", {}).items():
            checks[f"rank 1: {name}"] = check
        mine, theirs = result.get("val_metrics", {}), other.get("val_metrics", {})
        same = bool(mine) and mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) < 1e-5 for k in mine)
        checks["val/* synchronized: equal on both ranks"] = {"ok": same, "detail": f"rank 0 {mine}, rank 1 {theirs}"}
        cuda1 = other.get("device", "")
        ok = other.get("device") is not None and other.get("device") != result.get("device")
        checks["ranks on different devices"] = {"ok": ok, "detail": f"{result.get('device')} and {cuda1}"}


# --------------------------------------------------------------------------------------------- the report
def _gb(value: float | None) -> str:
    return f"{value / GB:.2f}" if value else "n/a"


def _ms(value: float | None) -> str:
    return f"{1000 * value:.0f}" if value is not None and math.isfinite(value) else "n/a"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"]
    for name in ("lightning", "torchmetrics", "diffusers", "transformers", "peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _gpus() -> str:
    if not torch.cuda.is_available():
        return "none"
    names = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        names.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor})")
    return f"{len(names)} x " + "; ".join(sorted(set(names))) if len(set(names)) == 1 else "; ".join(names)


def write_report(path: Path, header: list[str], jobs: list[Job], outcomes: dict[str, Outcome], notes: list[str]):
    lines = [*header, ""]
    lines += [
        "| job | status | precision | px | peak GPU alloc. train (GB) | peak GPU alloc. render (GB) | "
        "peak RSS (GB) | step (ms) | UNet fwd+bwd (ms) | ratio | wall (s) | checks |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for job in jobs:
        o = outcomes.get(job.name)
        if o is None:
            lines.append(f"| {job.name} | not run | {job.precision} | {job.resolution} |" + " |" * 8)
            continue
        if o.status == "skipped":
            lines.append(f"| {job.name} | skipped: {job.skip} | {job.precision} | {job.resolution} |" + " |" * 8)
            continue
        r = o.result
        step, unet = r.get("step_s"), r.get("unet_s")
        ratio = f"{step / unet:.3f}" if step and unet and math.isfinite(step) and math.isfinite(unet) else "n/a"
        passed = sum(c["ok"] for c in o.checks.values())
        lines.append(
            f"| {job.name} | {o.status} | {r.get('precision', job.precision)} | {job.resolution} | "
            f"{_gb(r.get('peak_allocated', {}).get('train'))} | {_gb(r.get('peak_allocated', {}).get('render'))} | "
            f"{_gb(o.peak_rss)} | {_ms(step)} | {_ms(unet)} | {ratio} | {o.wall_s:.0f} | "
            f"{passed}/{len(o.checks)} |"
        )
    lines += ["", "Jobs:", ""] + [f"- `{j.name}`: {j.what}." for j in jobs]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    for job in jobs:
        o = outcomes.get(job.name)
        if o is None or o.status == "skipped":
            continue
        lines += ["", f"### {job.name}: {o.status}", "", "| check | result | detail |", "|---|---|---|"]
        for name, c in o.checks.items():
            detail = str(c["detail"]).replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {name} | {'ok' if c['ok'] else '**FAILED**'} | {detail} |")
        if o.result.get("exception"):
            lines += ["", f"Exception: `{o.result['exception'][:500]}`"]
        if o.log_tail:
            lines += ["", "<details><summary>log tail</summary>", "", "```", o.log_tail, "```", "", "</details>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _gpu_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "gpu"
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "rtx")]
    return next((re.sub(r"[^a-z0-9]", "", w) for w in words if re.search(r"\d", w)), "gpu") or "gpu"


def _bnb_runs_on(device: str) -> str | None:
    """None when bitsandbytes' AdamW8bit steps a tensor on ``device``; else why not."""
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(4096, 2, device=device))
        optimizer = bnb.optim.AdamW8bit([p])
        p.grad = torch.randn_like(p)
        optimizer.step()
        return None
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:200]}"


def _prepare_data(ctx: Context, resolution: int) -> None:
    make_data(ctx.workdir / "data", resolution, num_instance=4, num_class=4)
    from datamodules.toy_subject import draw_toy_subject

    draw_toy_subject(ctx.dreambench / "red_ball", num_images=2, resolution=resolution, seed=3)
    draw_toy_subject(ctx.dreambench / "blue_dog", num_images=2, resolution=resolution, seed=4)
    (ctx.dreambench / "prompts_and_classes.txt").write_text(DREAMBENCH_TABLE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode: builtin:tiny-sd, 64 px, a few steps")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/<gpu|cpu>_device_check_*.md)")
    parser.add_argument("--only", help="comma-separated job names to run (default: all)")
    parser.add_argument("--runner", choices=("subprocess", "in-process"), default="subprocess",
                        help="each job in its own process with a timeout (default), or through train.cli_main here")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop starting jobs once this many seconds have passed; each job's timeout is cut to "
                             "what is left (default 450: the script ends within 8 minutes)")  # fmt: skip
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every job's timeout")
    parser.add_argument("--workdir", type=Path, help="keep runs, logs and results here (default: a temporary folder)")
    parser.add_argument("--job-arg", action="append", default=[], metavar="JOB=ARG",
                        help="append a CLI argument to one job, e.g. predict=--model.sampling.sampler=ddim "
                             "(repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads in the jobs (default: torch's own; 1 with --smoke, where the tiny "
                             "model's small operations lose more to thread hand-offs than they gain, most of all on a "
                             "shared CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        print("No CUDA GPU here: run on a GPU machine, or with --smoke on the CPU.", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if not args.smoke else 0
    out = args.out or ROOT / "bench" / "results" / (
        "cpu_device_check_smoke.md" if args.smoke else f"gpu_device_check_{_gpu_slug()}.md")  # fmt: skip
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="device_check_")
    workdir = (args.workdir or Path(tmp.name)).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        smoke=args.smoke, accelerator="cpu" if args.smoke else "gpu", expect_device="cpu" if args.smoke else "cuda",
        model="builtin:tiny-sd" if args.smoke else "builtin:sd15-random", workdir=workdir,
        instance=workdir / "data" / "instance", class_dir=workdir / "data" / "class",
        dreambench=workdir / "dreambench", runner=args.runner, threads=args.threads or (1 if args.smoke else None),
    )  # fmt: skip
    # On a GPU, 8-bit AdamW on CUDA is one of the things checked: the full job uses it and fails if it does not run.
    # On the CPU it depends on the bitsandbytes build (0.50 runs it): try it first, else fall back to adamw.
    why_not_8bit = _bnb_runs_on("cpu") if args.smoke else None
    if why_not_8bit:
        ctx.optimizer_8bit = "adamw"
        ctx.notes.append(f"bitsandbytes' AdamW8bit does not run on the CPU here ({why_not_8bit}): "
                         "the full fine-tuning job uses adamw")  # fmt: skip
    for item in args.job_arg:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--job-arg takes JOB=ARG, got {item!r}")
        ctx.extra_args.setdefault(name, []).append(value)
    jobs = make_jobs(ctx, gpus)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = wanted - {j.name for j in jobs}
        if unknown:
            parser.error(f"unknown jobs {sorted(unknown)}; known: {[j.name for j in jobs]}")
        jobs = [j for j in jobs if j.name in wanted]
    print(f"device_check: {len(jobs)} jobs, work folder {workdir}, results -> {out}", flush=True)
    try:
        outcomes = run_jobs(ctx, jobs, args, out, started, argv)
    finally:
        if tmp is not None:
            tmp.cleanup()
    bad = [name for name, o in outcomes.items() if o.status not in ("ok", "skipped")]
    if out.is_file():  # the summary table, for the console
        print(out.read_text().split("\n\nJobs:", 1)[0], flush=True)
    print(f"device_check: results in {out}", flush=True)
    if bad:
        print(f"device_check: FAILED jobs: {', '.join(bad)}", file=sys.stderr, flush=True)
        return 1
    print("device_check: all jobs passed", flush=True)
    return 0


def _build_job_model(ctx: Context, job: Job) -> str | None:
    """Build a job's own base model (a built-in, once) before it runs, noting the time; the traceback if it fails."""
    from sd.models.builtin import builtin_path, resolve_pretrained

    if not job.model.startswith("builtin:") or (builtin_path(job.model) / "model_index.json").is_file():
        return None
    start = time.perf_counter()
    try:
        resolve_pretrained(job.model)
    except Exception:
        return traceback.format_exc()
    ctx.notes.append(f"{job.name}: {job.model} built in {time.perf_counter() - start:.0f} s before the job")
    return None


def run_jobs(
    ctx: Context, jobs: list[Job], args: argparse.Namespace, out: Path, started: float, argv: list[str] | None
) -> dict[str, Outcome]:
    """Build the model and the data, run the jobs in sequence within the budget, rewrite ``out`` after each."""
    from sd.models.builtin import resolve_pretrained

    build_start = time.perf_counter()
    build_error = None
    try:
        if any(not j.skip and j.model is None for j in jobs):
            resolve_pretrained(ctx.model)  # built once, before any job: ~1 minute and 4 GB for sd15-random
        _prepare_data(ctx, 64 if ctx.smoke else 512)
    except Exception:
        build_error = traceback.format_exc()
    build_s = time.perf_counter() - build_start
    header = [
        f"# bench/device_check.py{' --smoke (CPU)' if ctx.smoke else ''}: {ctx.model}",
        "",
        f"- machine: {machine()}",
        f"- GPUs: {_gpus()}",
        f"- versions: {_versions()}; Python {platform.python_version()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; command: `python bench/device_check.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- model build + data: {build_s:.0f} s; runner: {args.runner}; GB = 10^9 bytes; "
        "peak GPU memory = torch.cuda.max_memory_allocated in the job's process (train: the optimizer steps; render: "
        "validation / predict / test); ratio = median step time / median UNet forward+backward of the same batch "
        "(bench/train_step.py)",
    ]
    outcomes: dict[str, Outcome] = {}
    for job in jobs:
        left = args.budget_s - (time.perf_counter() - started)
        if build_error:
            outcomes[job.name] = Outcome("FAILED", log_tail=f"model build / data failed:\n{build_error}")
        elif not job.skip and left < 30:
            ctx.notes.append(f"{job.name}: not run, the budget (--budget-s {args.budget_s:g}) was spent")
            outcomes[job.name] = Outcome("FAILED", log_tail="not run: budget spent")
        elif not job.skip and job.model and (model_error := _build_job_model(ctx, job)):
            outcomes[job.name] = Outcome("FAILED", log_tail=f"model build failed:\n{model_error}")
        else:
            left = args.budget_s - (time.perf_counter() - started)
            timeout = min(job.timeout_s * args.timeout_scale, left)
            print(f"device_check: {job.name} (timeout {timeout:.0f} s) ...", flush=True)
            outcomes[job.name] = run_job(ctx, job, timeout)
        o = outcomes[job.name]
        failed = [n for n, c in o.checks.items() if not c["ok"]]
        print(f"device_check: {job.name}: {o.status} in {o.wall_s:.0f} s" + (f"; failed: {failed}" if failed else ""),
              flush=True)  # fmt: skip
        write_report(out, header, jobs, outcomes, ctx.notes)
    header[-1] += f"; total {time.perf_counter() - started:.0f} s"
    write_report(out, header, jobs, outcomes, ctx.notes)
    return outcomes


if __name__ == "__main__":
    sys.exit(main())
