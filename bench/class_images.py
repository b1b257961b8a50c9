"""Class-image generation benchmark: time per image against UNet forward time x steps x 2 (classifier-free
guidance) for the same batch, measured in the same run.

    python bench/class_images.py [--model builtin:small-sd] [--resolution 128] [--steps 25] [--batch-sizes 1 4]

Time per image is the marginal cost of the real ``generate_class_images`` (DPM-Solver++, prompt encoded once, VAE
decode, PNG written atomically): (time for 2b images - time for b images) / b at batch size b, so loading the model
and encoding the prompt, paid once per run, are left out. The reference is the UNet alone on b rows (the same
latent size and text-embedding shape), times ``steps`` x 2; generation actually runs the UNet on the 2b rows of the
guided batch at once, so the table also gives that stricter reference (``fwd(2b) x steps``). Generation and
reference alternate, ``--rounds`` times, and the medians are compared. Target: <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from datamodules.class_images import generate_class_images  # noqa: E402
from sd.models.loading import load_pipeline  # noqa: E402

PROMPT = "a photo of ball"


def unet_forward_s(pipe, rows: int, side: int, repeats: int = 3) -> float:
    """Median time of one UNet forward on ``rows`` rows of (4, side, side) latents with the prompt's embeddings."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, pipe.device, 1, False)  # (1, 77, D)
        latents = torch.randn(rows, pipe.unet.config.in_channels, side, side)
        timestep = torch.tensor(500)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.unet(latents, timestep, encoder_hidden_states=embeds.expand(rows, -1, -1))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate_s(args, folder: Path, count: int, batch_size: int) -> float:
    start = time.perf_counter()
    made = generate_class_images(
        args.model, PROMPT, folder, count, args.resolution, batch_size=batch_size, num_inference_steps=args.steps
    )
    assert made == count
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-sd")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    side = args.resolution // pipe.vae_scale_factor
    print(f"# bench/class_images.py: {args.model} at {args.resolution} px, {args.steps} DPM-Solver++ steps, CFG 7.5")
    print(f"# {machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| batch | per image (ms) | fwd(b) x steps x 2 / b (ms) | ratio | fwd(2b) x steps / b (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batch_sizes:
            per_image, ref, ref_guided = [], [], []
            for r in range(args.rounds):
                one = generate_s(args, Path(tmp) / f"b{b}-r{r}-one", b, b)
                ref.append(unet_forward_s(pipe, b, side) * args.steps * 2 / b)
                two = generate_s(args, Path(tmp) / f"b{b}-r{r}-two", 2 * b, b)
                ref_guided.append(unet_forward_s(pipe, 2 * b, side) * args.steps / b)
                per_image.append((two - one) / b)
            p, r1, r2 = (statistics.median(v) for v in (per_image, ref, ref_guided))
            print(
                f"| {b} | {1000 * p:.0f} | {1000 * r1:.0f} | {p / r1:.3f} | {1000 * r2:.0f} | {p / r2:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
