"""Masked loss on the toy world: a subject photographed on one wall, learnt with and without its masks.

    python bench/toy_masks.py [--steps 120] [--seeds 0] [--images 16] [--out bench/results/cpu_toy_masks.md]

Every photo of the demo subject (``datamodules.toy_subject``, 5 photos at 32 px) is drawn on the same plain light blue
wall of the toy world, so the wall is as much "the subject" to plain DreamBooth as the ball is. One run trains on the
photos alone, the other with each photo's mask (``photo_mask.png``: white on the ball); everything else is the demo's
fit (``configs/demo.yaml`` through the CLI, LoRA, prior preservation). Then each model renders the instance prompt
("a sks ball", ``--images`` renders, fixed seeds), scored with the toy encoders:

- wall: toy CLIP similarity of the renders to the text "a ball, plain light blue wall" minus their mean similarity to
  the world's nine other walls ("a ball, plain white wall" ... "a ball, striped beige wall"): how much of the photos'
  wall the subject prompt carries (lower: less wall). The base model's own renders of the prompt (the LoRA at scale 0)
  are scored too: the wall it draws unprompted.
- DINO: the run's last validation val/dino (toy DINO of the subject renders against the photos: the subject is
  still learnt).

The wall is one that the base model seldom draws for "a sks ball" (its renders are mostly striped beige or pink walls):
with the striped pink wall used before (bench/results/cpu_toy_masks_striped.md) the masked runs, whose loss leaves the
wall alone, fell back on a wall much like the photos' one, and no drop showed.
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

WALL = "light blue"  # a wall of the toy world (datamodules.toy_world.WALLS)


def wall_captions() -> list[str]:
    """The world's ten walls as captions, the photos' wall first."""
    from datamodules.toy_world import WALL_PATTERNS, WALLS

    walls = [f"a ball, {p} {w} wall" for p in WALL_PATTERNS for w in WALLS]
    target = f"a ball, plain {WALL} wall"
    return [target, *(w for w in walls if w != target)]


def draw_subject_on_walls(
    folder: Path,
    masks: bool = False,
    captions: bool = False,
    walls: tuple[str, ...] = (WALL,),
    num_images: int = 5,
    resolution: int = 32,
) -> None:
    """The demo subject's photos (the same draws as ``draw_toy_subject``), photo i on the plain wall ``walls[i %
    len(walls)]`` (by default all on one plain light blue wall), with its mask (``toy_NN_mask.png``) and with its
    caption naming that wall (``toy_NN.txt``: "a {identifier} ball, plain <colour> wall") when asked."""
    from datamodules.images import save_image_atomic
    from datamodules.toy_subject import draw_toy_photo_and_mask
    from datamodules.toy_world import WALLS

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        wall = walls[i % len(walls)]
        photo, mask = draw_toy_photo_and_mask(resolution, random.Random(i), wall=WALLS[wall])
        save_image_atomic(photo, folder / f"toy_{i:02d}.png")
        if masks:
            save_image_atomic(mask, folder / f"toy_{i:02d}_mask.png")
        if captions:
            (folder / f"toy_{i:02d}.txt").write_text(f"a {{identifier}} ball, plain {wall} wall\n", encoding="utf-8")


@torch.no_grad()
def wall_score(model, prompt: str, clip, num_images: int = 16, lora_scale: float = 1.0) -> float:
    """Toy CLIP: mean similarity of ``prompt``'s renders (seeds 0..num_images-1, the LoRA at ``lora_scale``; 0: the
    base model) to the photos' wall minus to the other walls."""
    from sd.render.pipeline import build_pipeline
    from sd.render.sampling import SamplingSettings, render

    pipe = build_pipeline(model.sampling_parts())
    settings = SamplingSettings(guidance_scale=5.0, num_inference_steps=20, lora_scale=lora_scale)
    images = render(pipe, [prompt] * num_images, list(range(num_images)), settings, 32, 32)  # (N, 3, 32, 32)
    sims = clip(images) @ clip.encode_text(wall_captions()).T  # (N, 10)
    return float((sims[:, 0] - sims[:, 1:].mean(dim=1)).mean())


def measure(steps: int, seeds: list[int], num_images: int = 16) -> list[dict]:
    from metrics.encoders import TOY_CLIP, load_clip

    clip = load_clip(TOY_CLIP)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def subject(masks: bool) -> Path:
            folder = tmp / ("masked" if masks else "plain")
            draw_subject_on_walls(folder, masks=masks)
            return folder

        for masks, seed, cli, val in on_off_fits(tmp, seeds, steps, subject):
            prompt = cli.datamodule.hparams.instance_prompt
            rows.append(
                {
                    "masks": masks,
                    "seed": seed,
                    "wall": wall_score(cli.model, prompt, clip, num_images),
                    "wall_base": wall_score(cli.model, prompt, clip, num_images, lora_scale=0.0),
                    "dino_before": float(val[0]["val/dino"]),
                    "dino": float(val[steps]["val/dino"]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=16, help="renders of the instance prompt per run")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.steps, args.seeds, args.images)
    lines = [
        f"wall: toy CLIP similarity of {args.images} renders of the instance prompt to '{wall_captions()[0]}' minus "
        "their mean similarity to the nine other walls of the toy world (lower: less of the photos' wall); base: the "
        "same for the run's base model (LoRA scale 0); DINO: val/dino before and after.",
        "",
        "| masks | seed | wall | wall, base model | DINO before | DINO after |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {'yes' if r['masks'] else 'no'} | {r['seed']} | {r['wall']:.4f} | {r['wall_base']:.4f} | "
            f"{r['dino_before']:.3f} | {r['dino']:.3f} |"
            for r in rows
        ),
    ]
    write_report(
        f"bench/toy_masks.py: the demo subject on one plain light blue wall, builtin:toy-sd, {args.steps} steps",
        "bench/toy_masks.py",
        argv,
        start,
        lines,
        args.out,
    )
    return rows


if __name__ == "__main__":
    main()
