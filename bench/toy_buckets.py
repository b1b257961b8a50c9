"""Aspect-ratio buckets on the toy world: the subject near the edge of wide photos, learnt with square center crops
and with buckets.

    python bench/toy_buckets.py [--steps 120] [--seeds 0] [--out bench/results/cpu_toy_buckets.md]

The demo subject (``datamodules.toy_subject``) is drawn as usual (a 48 px square photo each), then each photo is
widened to 80 x 48 (5:3) by extending its wall and floor sideways, so that the ball's center sits 8 px from the left
edge (or, mirrored, the right one; the larger balls reach a little past it). A square center crop (the shorter side
resized to the toy model's 32 px, then the middle 32 columns: x from 16 to 64 of 80) keeps at most a sliver of the
ball; the bucket of 5:3 at 32 px (step 8: 40 x 24) keeps the whole photo. Both runs are the demo's fit
(``configs/demo.yaml`` through the CLI, LoRA, prior preservation), with and without ``--data.buckets true``. Then each
model renders the instance prompt ("a sks ball", 8 images, fixed seeds) at 32 x 32 and at the wide bucket's 40 x 24
(the aspect the photos have), scored with toy DINO against the square photos the wide ones were made from (the whole
ball): how well the subject was learnt. (The run's own val/dino compares with the wide photos through DINO's center
crop, which cuts the ball off as the square crop does, so it is not the measure here.)

Measured (bench/results/cpu_toy_buckets.md, seeds 0-2, 120 steps): buckets beat square crops at 40 x 24 (0.476
against 0.147 on average; +0.63, +0.17, +0.19 per seed) and at 32 x 32 (0.415 against 0.179; +0.32, +0.23, +0.15).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import on_off_fits, toy_bench_parser, write_report  # noqa: E402

WIDTH, HEIGHT, BALL_X = 80, 48, 8  # the wide photos (5:3); the ball's center this far from the nearer edge


def draw_wide_subject(folder: Path, squares: Path, num_images: int = 5) -> None:
    """Wide photos of the demo subject near an edge into ``folder``; the square photos they come from into
    ``squares``."""
    from datamodules.images import save_image_atomic
    from datamodules.toy_subject import draw_toy_photo_and_mask

    folder.mkdir(parents=True, exist_ok=True)
    squares.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        photo, mask = draw_toy_photo_and_mask(HEIGHT, random.Random(i))
        weights = np.asarray(mask, dtype=np.float64)
        cx = float((weights.sum(axis=0) * np.arange(HEIGHT)).sum() / weights.sum())  # the ball's center column
        pixels = np.asarray(photo)  # (48, 48, 3)
        dx = int(round(BALL_X - cx))
        columns = [min(max(x - dx, 0), HEIGHT - 1) for x in range(WIDTH)]  # the photo's, its edge columns repeated
        wide = Image.fromarray(np.ascontiguousarray(pixels[:, columns]))
        if i % 2:  # every other ball near the right edge
            wide = wide.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        save_image_atomic(wide, folder / f"toy_{i:02d}.png")
        save_image_atomic(photo, squares / f"toy_{i:02d}.png")


@torch.no_grad()
def subject_dino(
    model, prompt: str, dino, references: torch.Tensor, num_images: int = 8, size: tuple[int, int] = (32, 32)
) -> float:
    """Toy DINO: mean cosine of ``prompt``'s renders (fixed seeds, (height, width) ``size``) to ``references``
    (R, 3, H, W) in [0, 1]."""
    from sd.render.pipeline import build_pipeline

    pipe = build_pipeline(model.sampling_parts())
    g = torch.Generator().manual_seed(1234)
    images = pipe(
        [prompt] * num_images, num_inference_steps=20, guidance_scale=5.0, generator=g, output_type="pt",
        height=size[0], width=size[1],
    ).images  # (N, 3, *size) in [0, 1]  # fmt: skip
    return float((dino(images) @ dino(references).T).mean())


def measure(steps: int, seeds: list[int], num_images: int = 8) -> list[dict]:
    from metrics.encoders import TOY_DINO, load_dino

    dino = load_dino(TOY_DINO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject, squares = tmp / "wide", tmp / "squares"
        draw_wide_subject(subject, squares)
        references = torch.stack(
            [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in sorted(squares.iterdir())]
        ).float() / 255.0  # fmt: skip
        overrides = lambda buckets: [f"--data.buckets={str(buckets).lower()}"]  # noqa: E731
        for buckets, seed, cli, val in on_off_fits(tmp, seeds, steps, lambda _: subject, overrides):
            prompt = cli.datamodule.hparams.instance_prompt
            rows.append(
                {
                    "buckets": buckets,
                    "seed": seed,
                    "dino": subject_dino(cli.model, prompt, dino, references, num_images),
                    "dino_wide": subject_dino(cli.model, prompt, dino, references, num_images, (24, 40)),
                    "val_dino": float(val[steps]["val/dino"]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=8, help="renders of the instance prompt per run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.steps, args.seeds, args.images)
    lines = [
        f"DINO: toy DINO of {args.images} renders of the instance prompt (square, and at the wide bucket's size) against the square photos the wide ones were "
        "made from, at 48 px (the whole ball; higher: the subject better learnt). val/dino: the run's last validation (against "
        "the wide photos through DINO's center crop, for reference).",
        "",
        "| buckets | seed | DINO (32 x 32 renders) | DINO (40 x 24 renders) | val/dino |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {'yes' if r['buckets'] else 'no (square center crop)'} | {r['seed']} | {r['dino']:.4f} | {r['dino_wide']:.4f} | "
            f"{r['val_dino']:.3f} |"
            for r in rows
        ),
    ]
    write_report(
        f"bench/toy_buckets.py: the demo subject near the edge of 80 x 48 photos, builtin:toy-sd, {args.steps} steps",
        "bench/toy_buckets.py",
        argv,
        start,
        lines,
        args.out,
    )
    return rows


if __name__ == "__main__":
    main()
