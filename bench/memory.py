"""Memory benchmark: peak resident memory of the whole training process, and step time, per configuration.

    python bench/memory.py [--model builtin:sd15-random] [--resolution 256] [--steps 3] [--only TEXT] [--phases]

Each configuration is a real ``train.py fit`` in a fresh process: the real SD 1.5 architecture with random weights
(``builtin:sd15-random``, built by the project on first use, no download), fp32 on the CPU (``precision 32-true``),
one instance and one class image per step, with its own latent / text-embedding cache built in that process. The
peak is the child's maximum resident set size (``os.wait4`` -> ``ru_maxrss``): everything the process held at its
worst moment, the Python libraries included. Checkpointing and the export at the end are off (they are not
training). Step time is the median over the steps after the first.

``--phases`` adds, under each row, the resident memory at the phases of the fit (caches built, model loaded, the first
two steps' forward and backward): whether the peak is set while loading or inside a step.

Targets: LoRA <= 4.4 GB in fp32 and <= 3.0 GB with frozen weights in bf16 (``bf16-mixed``); full UNet fine-tuning
with 8-bit AdamW and gradient checkpointing <= 7.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PHASE_PREFIX, RESULT_PREFIX, ROOT, bench_config, machine, make_data  # noqa: E402

DEFAULT_MODEL = "builtin:sd15-random"
LORA = ["--model.use_lora=true", "--model.gradient_checkpointing=true", "--model.trim_cpu_memory=true"]
FULL = [
    "--model.use_lora=false", "--model.optimizer=adamw8bit", "--model.gradient_checkpointing=true",
    "--model.fused_backward=true", "--model.trim_cpu_memory=true",
]  # fmt: skip


def _flip(base: list[str], option: str, value: str) -> list[str]:
    """``base`` with one option set to ``value`` (replaced, or appended when absent)."""
    kept = [a for a in base if not a.startswith(f"--{option}=")]
    return [*kept, f"--{option}={value}"]


# name -> (overrides, target in GB or None). The two best configurations first, then each saver turned off (or
# another one on) one at a time.
CONFIGS: dict[str, tuple[list[str], float | None]] = {
    "LoRA: caches, grad. ckpt, trim_cpu_memory (best fp32)": (LORA, 4.4),
    "LoRA, without trim_cpu_memory": (_flip(LORA, "model.trim_cpu_memory", "false"), None),
    "LoRA, without gradient checkpointing": (_flip(LORA, "model.gradient_checkpointing", "false"), None),
    "LoRA, without the latent cache (VAE + text encoder held, run each step)": (
        _flip(LORA, "data.cache_latents", "false"),
        None,
    ),
    "LoRA, with eager attention instead of SDPA": (_flip(LORA, "model.attention", "eager"), None),
    "LoRA, with channels_last": (_flip(LORA, "model.channels_last", "true"), None),
    "LoRA, with frozen weights in bf16 (bf16-mixed; not fp32)": (_flip(LORA, "trainer.precision", "bf16-mixed"), 3.0),
    "full UNet: 8-bit AdamW, grad. ckpt, fused backward, trim_cpu_memory (best)": (FULL, 7.5),
    "full, without fused backward": (_flip(FULL, "model.fused_backward", "false"), 7.5),
    "full, without gradient checkpointing": (_flip(FULL, "model.gradient_checkpointing", "false"), None),
    "full, without trim_cpu_memory": (_flip(FULL, "model.trim_cpu_memory", "false"), None),
    "full, with 32-bit AdamW instead of 8-bit": (_flip(FULL, "model.optimizer", "adamw"), None),
}


def run(name: str, overrides: list[str], data: tuple[Path, Path], args, workdir: Path) -> dict:
    """Run one configuration in a fresh process; return its peak RSS (bytes) and median step time."""
    instance, klass = data
    cmd = [
        sys.executable, "train.py", "fit", "--config", str(bench_config(workdir)),
        "--model.pretrained_model_name_or_path", args.model, "--model.train_text_encoder=false",
        "--model.lora_rank=8", f"--trainer.precision={args.precision}", f"--trainer.accelerator={args.accelerator}",
        "--data.cache_latents=true",
        "--data.resolution", str(args.resolution), "--data.batch_size=1", "--data.random_flip=false",
        "--data.instance_data_dir", str(instance), "--data.class_data_dir", str(klass), "--data.num_class_images=1",
        "--data.cache_dir", str(workdir / f"cache-{abs(hash(name))}"),
        "--trainer.max_steps", str(args.steps + 1), "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=bench.common.StepTimer",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false",
        "--trainer.default_root_dir", str(workdir / "runs"), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
        "--export.enabled=false",
        *(["--trainer.callbacks+=bench.common.MemoryPhases"] if args.phases else []),
        *overrides,
    ]  # fmt: skip
    log = workdir / "child.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {text[-1500:]}"}
    phases = [json.loads(ln[len(PHASE_PREFIX) :]) for ln in text.splitlines() if ln.startswith(PHASE_PREFIX)]
    return {"peak_bytes": usage.ru_maxrss * 1024, "phases": phases, **json.loads(lines[-1][len(RESULT_PREFIX) :])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="e.g. builtin:sdxl-random (the targets are SD 1.5's)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--only", help="run only the configurations whose name contains this")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu: then the table adds the peak GPU memory")
    parser.add_argument("--precision", default="32-true", help="e.g. 16-mixed or bf16-mixed on a GPU")
    parser.add_argument("--phases", action="store_true",
                        help="also print each run's resident memory at the phases of its fit (caches built, model "
                             "loaded, each of the first two steps' forward and backward): where the peak is set")  # fmt: skip
    args = parser.parse_args()
    gpu = args.accelerator != "cpu"
    from sd.models.builtin import resolve_pretrained

    resolve_pretrained(args.model)  # build it once (minutes, ~4 GB for sd15-random) before timing anything
    configs = {k: v for k, v in CONFIGS.items() if not args.only or args.only in k}
    where = f"{args.precision} on {args.accelerator} (unless a row sets trainer.precision)"
    targets = args.model == DEFAULT_MODEL and args.resolution == 256 and not gpu  # the targets are SD 1.5's at 256 px
    print(f"# bench/memory.py: {args.model} at {args.resolution} px, {where}, 1 instance + 1 class image/step")
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}; GB = 10^9 bytes, GiB = 2^30 bytes")
    gpu_cols = " GPU peak allocated (GB) | GPU peak reserved (GB) |" if gpu else ""
    print(f"| configuration | peak RSS (GB) | peak RSS (GiB) |{gpu_cols} step (s) | target |")
    print("|---|---:|---:|" + ("---:|---:|" if gpu else "") + "---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = make_data(workdir / "data", args.resolution, num_instance=1, num_class=1)
        for name, (overrides, target) in configs.items():
            r = run(name, overrides, data, args, workdir)
            if "error" in r:
                print(f"| {name} | failed | | | {r['error'][-300:]!r} |", flush=True)
                continue
            gb, gib = r["peak_bytes"] / 1e9, r["peak_bytes"] / 2**30
            verdict = "" if target is None or not targets else f"<= {target} GB: {'met' if gb <= target else 'MISSED'}"
            cells = f" {r['cuda_peak_allocated'] / 1e9:.2f} | {r['cuda_peak_reserved'] / 1e9:.2f} |" if gpu else ""
            print(f"| {name} | {gb:.2f} | {gib:.2f} |{cells} {r['step_s']:.2f} | {verdict} |", flush=True)
            for phase in r["phases"]:  # (--phases) GB = 10^9 bytes
                print(f"|   {phase['phase']}: peak so far {phase.get('VmHWM', 0) / 1e9:.2f}, anonymous "
                      f"{phase.get('RssAnon', 0) / 1e9:.2f}, file-backed {phase.get('RssFile', 0) / 1e9:.2f} | | |"
                      + (" | |" if gpu else "") + " | |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
