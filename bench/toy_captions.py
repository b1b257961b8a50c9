"""Per-image captions on the toy world: do captions that name each photo's wall let the prompt change the wall?

Measured (bench/results/cpu_toy_captions.md, seeds 0-2, 120 steps; cpu_toy_captions_360steps.md, 360): the captions
gave more wall control on average (0.301 against 0.219; at 360 steps 0.243 against 0.203) but not on every seed (seed
1: -0.001 at 120 steps, +0.005 at 360).

    python bench/toy_captions.py [--steps 120] [--seeds 0] [--out bench/results/cpu_toy_captions.md]

The demo subject's photos (``datamodules.toy_subject``, 5 at 32 px, the same draws as the demo) are each drawn on a
plain wall of another toy-world colour. One run trains every photo on the instance prompt ("a sks ball"); the other
gives each photo its caption, ``photo.txt``: "a {identifier} ball, plain <colour> wall". Everything else is the demo's
fit (``configs/demo.yaml`` through the CLI). Then each model renders "a sks ball, plain <colour> wall" for every
colour (4 images each, fixed seeds), scored with the toy CLIP:

- wall control: for the renders of each colour, the similarity to "a ball, plain <colour> wall" minus the mean
  similarity to the other colours' texts, averaged over colours (higher: the prompt sets the wall);
- DINO: the run's last validation val/dino (the subject is learnt either way).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import on_off_fits, toy_bench_parser, write_report  # noqa: E402

COLOURS = ("white", "gray", "pink", "light blue", "beige")  # the toy world's wall colours, one per photo


def draw_subject_on_walls(folder: Path, captions: bool, resolution: int = 32) -> None:
    from datamodules.images import save_image_atomic
    from datamodules.toy_subject import draw_toy_photo_and_mask
    from datamodules.toy_world import WALLS

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        photo, _ = draw_toy_photo_and_mask(resolution, random.Random(i), wall=WALLS[colour])
        save_image_atomic(photo, folder / f"toy_{i:02d}.png")
        if captions:
            (folder / f"toy_{i:02d}.txt").write_text(f"a {{identifier}} ball, plain {colour} wall\n", encoding="utf-8")


@torch.no_grad()
def wall_control(model, identifier: str, clip, num_images: int = 4) -> float:
    from sd.render.pipeline import build_pipeline

    pipe = build_pipeline(model.sampling_parts())
    text = clip.encode_text([f"a ball, plain {c} wall" for c in COLOURS])  # (C, D)
    margins = []
    for k, colour in enumerate(COLOURS):
        g = torch.Generator().manual_seed(1234)
        prompt = f"a {identifier} ball, plain {colour} wall"
        images = pipe(
            [prompt] * num_images, num_inference_steps=20, guidance_scale=5.0, generator=g, output_type="pt"
        ).images  # (N, 3, H, W) in [0, 1]
        sims = clip(images) @ text.T  # (N, C)
        others = torch.cat([sims[:, :k], sims[:, k + 1 :]], dim=1).mean(dim=1)
        margins.append(float((sims[:, k] - others).mean()))
    return sum(margins) / len(margins)


def measure(steps: int, seeds: list[int], num_images: int = 4) -> list[dict]:
    from metrics.encoders import TOY_CLIP, load_clip

    clip = load_clip(TOY_CLIP)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def subject(captions: bool) -> Path:
            folder = tmp / ("captioned" if captions else "plain")
            draw_subject_on_walls(folder, captions)
            return folder

        for captions, seed, cli, val in on_off_fits(tmp, seeds, steps, subject):
            rows.append(
                {
                    "captions": captions,
                    "seed": seed,
                    "control": wall_control(cli.model, cli.datamodule.hparams.identifier, clip, num_images),
                    "dino_before": float(val[0]["val/dino"]),
                    "dino": float(val[steps]["val/dino"]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=4, help="renders per wall colour per run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.steps, args.seeds, args.images)
    lines = [
        f"wall control: toy CLIP, {args.images} renders of 'a sks ball, plain <colour> wall' per colour, similarity to "
        "'a ball, plain <colour> wall' minus the mean to the other colours (higher: the prompt sets the wall); "
        "DINO: val/dino before and after.",
        "",
        "| captions | seed | wall control | DINO before | DINO after |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {'per photo' if r['captions'] else 'instance prompt'} | {r['seed']} | {r['control']:.4f} | "
            f"{r['dino_before']:.3f} | {r['dino']:.3f} |"
            for r in rows
        ),
    ]
    write_report(
        f"bench/toy_captions.py: the demo subject on 5 wall colours, builtin:toy-sd, {args.steps} steps",
        "bench/toy_captions.py",
        argv,
        start,
        lines,
        args.out,
    )
    return rows


if __name__ == "__main__":
    main()
