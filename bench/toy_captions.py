"""Per-image captions on the toy world: does a caption that names each photo's wall let the prompt change the wall?

    python bench/toy_captions.py [--steps 360] [--seeds 0] [--walls "light blue"] [--images 16]
                                 [--out bench/results/cpu_toy_captions.md]

The demo subject's photos (``datamodules.toy_subject``, 5 at 32 px, the same draws as the demo) are drawn on plain walls
of the toy world: by default all on the plain light blue wall of bench/toy_masks.py, a wall the base model seldom draws
for "a sks ball"; ``--walls`` cycles the photos over several. One run trains every photo on the instance prompt
("a sks ball"); the other gives each photo its caption, ``photo.txt``: "a {identifier} ball, plain <its wall> wall".
Everything else is the demo's fit (``configs/demo.yaml`` through the CLI, its steps by default). Then each model
renders "a sks ball, plain <colour> wall" for each of the world's five plain wall colours (``--images`` renders each,
seeds 0..N-1), scored with the toy CLIP:

- wall control of a colour: the renders' similarity to "a ball, plain <colour> wall" minus their mean similarity to
  the four other colours' texts (higher: the prompt sets the wall). Reported averaged over the colours no photo was
  drawn on ("other walls": what the captions are for, rendering the subject somewhere new) and over all five; the
  base model's (the LoRA at scale 0) for reference;
- DINO: the run's val/dino before and after (renders of the instance prompt against the photos).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import demo_steps, on_off_fits, toy_bench_parser, write_report  # noqa: E402
from bench.toy_masks import WALL, draw_subject_on_walls  # noqa: E402
from datamodules.toy_world import WALLS  # noqa: E402

COLOURS = tuple(WALLS)  # the toy world's wall colours


@torch.no_grad()
def wall_control(model, identifier: str, clip, num_images: int = 16, lora_scale: float = 1.0) -> dict[str, float]:
    """Per colour, toy CLIP: how much "a <identifier> ball, plain <colour> wall" (``num_images`` renders, seeds
    0..N-1, the LoRA at ``lora_scale``) looks like that colour's wall rather than the other four."""
    from sd.render.pipeline import build_pipeline
    from sd.render.sampling import SamplingSettings, render

    pipe = build_pipeline(model.sampling_parts())
    settings = SamplingSettings(guidance_scale=5.0, num_inference_steps=20, lora_scale=lora_scale)
    text = clip.encode_text([f"a ball, plain {c} wall" for c in COLOURS])  # (C, D)
    control = {}
    for k, colour in enumerate(COLOURS):
        prompt = f"a {identifier} ball, plain {colour} wall"
        images = render(pipe, [prompt] * num_images, list(range(num_images)), settings, 32, 32)  # (N, 3, 32, 32)
        sims = clip(images) @ text.T  # (N, C)
        others = torch.cat([sims[:, :k], sims[:, k + 1 :]], dim=1).mean(dim=1)
        control[colour] = float((sims[:, k] - others).mean())
    return control


def summary(control: dict[str, float], walls: tuple[str, ...]) -> dict[str, float | None]:
    """The mean control over the colours no photo is on (None when the photos cover all five) and over all five."""
    other = [v for c, v in control.items() if c not in walls]
    return {
        "control_other": sum(other) / len(other) if other else None,
        "control_all": sum(control.values()) / len(control),
    }


def measure(
    steps: int, seeds: list[int], walls: tuple[str, ...] = (WALL,), num_images: int = 16, base: bool = True
) -> list[dict]:
    """A row per (captions off / on, seed): the wall control summaries, per colour, and val/dino before and after;
    ``base`` adds the base model's control (the LoRA at scale 0) to the first row."""
    from metrics.encoders import TOY_CLIP, load_clip

    clip = load_clip(TOY_CLIP)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def subject(captions: bool) -> Path:
            folder = tmp / ("captioned" if captions else "plain")
            draw_subject_on_walls(folder, captions=captions, walls=walls)
            return folder

        for captions, seed, cli, val in on_off_fits(tmp, seeds, steps, subject):
            identifier = cli.datamodule.hparams.identifier
            control = wall_control(cli.model, identifier, clip, num_images)
            row = {
                "captions": captions,
                "seed": seed,
                **summary(control, walls),
                "per_colour": control,
                "dino_before": float(val[0]["val/dino"]),
                "dino": float(val[steps]["val/dino"]),
            }
            if base and not rows:
                row["base"] = summary(wall_control(cli.model, identifier, clip, num_images, lora_scale=0.0), walls)
            rows.append(row)
    return rows


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__, steps=demo_steps())
    parser.add_argument("--walls", nargs="+", choices=COLOURS, default=[WALL], help="the photos' walls, cycled")
    parser.add_argument("--images", type=int, default=16, help="renders per wall colour per run")
    args = parser.parse_args(argv)
    walls = tuple(args.walls)
    start = time.perf_counter()
    rows = measure(args.steps, args.seeds, walls, args.images)
    base = rows[0]["base"]
    lines = [
        f"The photos' walls: {', '.join(walls)}. Wall control (toy CLIP, {args.images} renders of 'a sks ball, plain "
        "<colour> wall' per colour: similarity to 'a ball, plain <colour> wall' minus the mean to the four other "
        "colours; higher: the prompt sets the wall), averaged over the colours no photo is on ('other walls') and over "
        f"all five. The base model (LoRA scale 0): {_number(base['control_other'])} other walls, "
        f"{_number(base['control_all'])} all five. DINO: val/dino before and after.",
        "",
        "| captions | seed | wall control, other walls | wall control, all five | "
        + " | ".join(COLOURS)
        + " | DINO before | DINO after |",
        "|---|---:|---:|---:|" + "---:|" * len(COLOURS) + "---:|---:|",
        *(
            f"| {'per photo' if r['captions'] else 'instance prompt'} | {r['seed']} | {_number(r['control_other'])} | "
            f"{r['control_all']:.3f} | "
            + " | ".join(f"{r['per_colour'][c]:.3f}" for c in COLOURS)
            + f" | {r['dino_before']:.3f} | {r['dino']:.3f} |"
            for r in rows
        ),
    ]
    write_report(
        f"bench/toy_captions.py: the demo subject on the plain {', '.join(walls)} wall(s), builtin:toy-sd, "
        f"{args.steps} steps",
        "bench/toy_captions.py",
        argv,
        start,
        lines,
        args.out,
    )
    return rows


if __name__ == "__main__":
    main()
