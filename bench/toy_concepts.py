"""Two subjects in one run (data.concepts) on the toy world: does each identifier render its own subject?

    python bench/toy_concepts.py [--steps 200] [--seeds 0] [--out bench/results/cpu_toy_concepts.md]

Concept "sks" is the demo subject (``datamodules.toy_subject``: a teal-and-orange checkered ball with a yellow star, 5
photos at 32 px); concept "ohwx" is the same drawings with the ball's colours permuted (red, green, blue -> blue, red,
green: a purple-and-green ball with a cyan star, walls and floors untouched), so the two differ only in the subject's
look. One demo fit (``configs/demo.yaml`` through the CLI, LoRA of the demo's rank 16, prior preservation on the shared
"a ball" class images) trains both, "a sks ball" and "a ohwx ball". Then both prompts are rendered (8 images each,
fixed seeds) and scored with toy DINO against each subject's photos: each identifier's renders should be closer to its
own photos than to the other's.

Measured (bench/results/cpu_toy_concepts.md, seeds 0-2, 200 steps, the subject and demo recipe of issue 15): both
identifiers' renders are closer to their own photos on every seed. Both identifiers are single CLIP tokens, as
practitioners pick them; with ``--second zwx`` (two tokens, ``z`` + ``wx``) the second identifier's renders looked like
the first subject on seeds 1-2 (cpu_toy_concepts_zwx.md, cpu_toy_concepts_360steps.md, cpu_toy_concepts_32renders.md,
cpu_toy_concepts_lr1e-3.md: 360 steps, 32 renders a prompt and 1e-3 did not change that).

Options for variants: ``--second`` (the second identifier), ``--look bee`` (the second subject a toy DreamBench ball of
another look, drawn with the same random draws), and ``--fit-option`` (any CLI option for the fit, e.g.
``--fit-option=--data.with_prior_preservation=false``); bench/results/cpu_toy_concepts_variants.md holds the variants
measured on the subject and recipe before issue 15.
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
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import toy_bench_parser, toy_fit, write_report  # noqa: E402
from bench.toy_buckets import subject_dino  # noqa: E402

NAMES = ("sks", "ohwx")  # single CLIP tokens both


def draw_two_subjects(
    root: Path, num_images: int = 5, resolution: int = 32, names: tuple[str, str] = NAMES, look: str = "permuted"
) -> dict[str, Path]:
    """The demo subject's photos into ``root/<names[0]>``; into ``root/<names[1]>`` the same with the ball's colours
    permuted (``look="permuted"``), or the same draws of a toy DreamBench subject's look (``bee``, ...)."""
    from bench.toy_dreambench import SUBJECTS
    from datamodules.images import save_image_atomic
    from datamodules.toy_subject import draw_toy_photo_and_mask

    folders = {name: root / name for name in names}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        photo, mask = draw_toy_photo_and_mask(resolution, random.Random(i))
        if look == "permuted":
            pixels = np.asarray(photo).astype(np.float64)
            weight = np.asarray(mask, dtype=np.float64)[..., None] / 255.0  # (H, W, 1): the ball
            other = pixels * (1 - weight) + pixels[..., [2, 0, 1]] * weight
            other = Image.fromarray(np.rint(other).astype(np.uint8))
        else:
            other = draw_toy_photo_and_mask(resolution, random.Random(i), look=SUBJECTS[look])[0]
        save_image_atomic(photo, folders[names[0]] / f"toy_{i:02d}.png")
        save_image_atomic(other, folders[names[1]] / f"toy_{i:02d}.png")
    return folders


def _photos(folder: Path) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


def measure(
    steps: int,
    seeds: list[int],
    num_images: int = 8,
    second: str = NAMES[1],
    look: str = "permuted",
    fit_options: tuple[str, ...] = (),
) -> list[dict]:
    """Rows of (seed, prompt, DINO against each subject's photos under ``sks`` / ``other``, val/dino/<concept>)."""
    from metrics.encoders import TOY_DINO, load_dino

    dino = load_dino(TOY_DINO)
    names = ("sks", second)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = draw_two_subjects(tmp / "subjects", names=names, look=look)
        concepts = [
            {"name": n, "instance_data_dir": str(folders[n]), "instance_prompt": f"a {n} ball", "identifier": n}
            for n in names
        ]
        overlay = tmp / "concepts.yaml"
        overlay.write_text(yaml.safe_dump({"data": {"instance_data_dir": None, "instance_prompt": None,
                                                    "concepts": concepts}}))  # fmt: skip
        photos = {n: _photos(folders[n]) for n in names}
        for seed in seeds:
            cli, val = toy_fit(tmp / f"run_{seed}", folders["sks"], tmp / "class", f"--seed_everything={seed}",
                               "--config", str(overlay), *fit_options, steps=steps)  # fmt: skip
            for prompt_of in names:
                row = {"seed": seed, "prompt": f"a {prompt_of} ball"}
                for photos_of, key in zip(names, ("sks", "other"), strict=True):
                    row[key] = subject_dino(cli.model, row["prompt"], dino, photos[photos_of], num_images)
                row["val_dino"] = float(val[steps][f"val/dino/{prompt_of}"])
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = toy_bench_parser(__doc__, steps=200)
    parser.add_argument("--images", type=int, default=8, help="renders per prompt")
    parser.add_argument("--second", default=NAMES[1], help=f"the second subject's identifier (default {NAMES[1]})")
    parser.add_argument(
        "--look", default="permuted", help="the second subject: permuted (default) or bee, berry, candy"
    )
    parser.add_argument("--fit-option", action="append", default=[], help="a CLI option for the fit (repeatable)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fit_options = tuple(args.fit_option)
    rows = measure(args.steps, args.seeds, args.images, args.second, args.look, fit_options)
    other = "its ball's colours permuted" if args.look == "permuted" else f"the toy DreamBench's {args.look} look"
    lines = [
        f"Toy DINO of {args.images} renders of each prompt against each subject's photos (sks: the demo subject; "
        f"{args.second}: {other}); val/dino/<concept>: the run's last validation of that concept. Fit options "
        f"beside configs/demo.yaml: {' '.join(fit_options) or 'none'}.",
        "",
        f"| seed | prompt | DINO vs sks photos | DINO vs {args.second} photos | val/dino/<concept> |",
        "|---:|---|---:|---:|---:|",
        *(f"| {r['seed']} | {r['prompt']} | {r['sks']:.4f} | {r['other']:.4f} | {r['val_dino']:.3f} |" for r in rows),
    ]
    title = f"bench/toy_concepts.py: two toy subjects in one run (data.concepts), builtin:toy-sd, {args.steps} steps"
    write_report(title, "bench/toy_concepts.py", argv, start, lines, args.out)
    return rows


if __name__ == "__main__":
    main()
