"""Training-step benchmark: steady-state time per optimizer step against the pure UNet forward + backward of the
same batch, measured in the same run.

    python bench/train_step.py [--model builtin:small-sd] [--resolution 128] [--steps 20] [--compile]

Each configuration is a real ``train.py fit`` (data module, caches, Lightning loop, logging, optimizer, scheduler) in
its own process, with one instance row and one class row per step (LoRA with prior preservation unless said
otherwise). After every step a callback times the UNet alone, forward and backward, on that step's batch (same
latents, noise, timesteps and text embeddings); the two are interleaved so that both see the same machine load. The
ratio of the medians is what the whole training loop costs on top of the UNet. Target: <= 1.15 for the first row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULT_PREFIX, ROOT, bench_config, machine, make_data, median  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "LoRA + prior, cached latents + text (target)": [],
    "LoRA + prior, latents not cached (VAE each step)": ["--data.cache_latents=false"],
    "LoRA + prior + text-encoder LoRA (text each step)": ["--model.train_text_encoder=true"],
    "LoRA + prior, channels_last": ["--model.channels_last=true"],
    "LoRA + prior, eager attention": ["--model.attention=eager"],
    "LoRA + prior, gradient checkpointing": ["--model.gradient_checkpointing=true"],
    "full UNet, AdamW": ["--model.use_lora=false"],
    "full UNet, AdamW fused into backward": ["--model.use_lora=false", "--model.fused_backward=true"],
}
COMPILE = {"LoRA + prior, torch.compile": ["--model.compile_unet=true"]}


AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the reference runs as training does


def _sync(module) -> None:
    if module.device.type == "cuda":  # time what the GPU did, not what was queued
        torch.cuda.synchronize()


class UNetReference(pl.Callback):
    """After each step, times the UNet forward + backward alone on that step's batch; prints both medians at the end.

    Args:
        warmup: Steps left out at the start.
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.step_times: list[float] = []
        self.unet_times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module)
        if self._last is not None:
            self.step_times.append(time.perf_counter() - self._last)  # the step, without this callback's own work
        self.unet_times.append(self._unet_forward_backward(pl_module, batch))
        self._last = time.perf_counter()

    @staticmethod
    def _unet_forward_backward(module, batch) -> float:
        from lightning_modules.memory import to_memory_format
        from sd.training.diffusion import add_noise

        with torch.no_grad():
            latents = module._latents(batch)
            noisy, noise, timesteps = add_noise(module.parts.noise_scheduler, latents)
            context, extra = module.unet_condition(batch, latents)
        noisy = to_memory_format(noisy, module.hparams.channels_last)
        _sync(module)
        start = time.perf_counter()
        with torch.autocast(
            module.device.type,
            dtype=AUTOCAST.get(module.trainer.precision),
            enabled=module.trainer.precision in AUTOCAST,
        ):
            pred = module.unet(noisy, timesteps, context, **extra).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        _sync(module)
        elapsed = time.perf_counter() - start
        for p in module.parameters():
            p.grad = None
        return elapsed

    def on_train_end(self, trainer, pl_module) -> None:
        steps, unet = self.step_times[self.warmup :], self.unet_times[self.warmup + 1 :]
        result = {"step_s": median(steps), "unet_s": median(unet), "n": len(steps)}
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def run(name: str, overrides: list[str], data: tuple[Path, Path], args, workdir: Path) -> dict:
    instance, klass = data
    cmd = [
        sys.executable, "train.py", "fit", "--config", str(bench_config(workdir)),
        "--model.pretrained_model_name_or_path", args.model,
        "--model.train_text_encoder=false", "--model.lora_rank=8",
        f"--trainer.accelerator={args.accelerator}", f"--trainer.precision={args.precision}",
        "--data.resolution", str(args.resolution), "--data.batch_size=1", "--data.random_flip=true",
        "--data.instance_data_dir", str(instance), "--data.class_data_dir", str(klass), "--data.num_class_images=4",
        "--data.cache_dir", str(workdir / "cache"),
        "--trainer.max_steps", str(args.steps + 4), "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=bench.train_step.UNetReference",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false",
        "--trainer.default_root_dir", str(workdir / "runs"), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
        "--export.enabled=false",
        *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-sd")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (after 4 warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    parser.add_argument("--only", help="run only the configurations whose name contains this")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    args = parser.parse_args()
    configs = CONFIGS | (COMPILE if args.compile else {})
    configs = {k: v for k, v in configs.items() if not args.only or args.only in k}
    where = f"{args.precision} on {args.accelerator}"
    print(f"# bench/train_step.py: {args.model} at {args.resolution} px, {where}, 1 instance + 1 class row per step")
    print(f"# {machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| configuration | step (ms) | UNet fwd+bwd (ms) | ratio |\n|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = make_data(workdir / "data", args.resolution, num_instance=4, num_class=4)
        for name, overrides in configs.items():
            r = run(name, overrides, data, args, workdir)
            ratio = r["step_s"] / r["unet_s"]
            print(f"| {name} | {1000 * r['step_s']:.0f} | {1000 * r['unet_s']:.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
