"""Scale sweep: render a grid over guidance x LoRA UNet scale x LoRA text-encoder scale and score every cell.

The by-hand search for inference settings, in one run: the same prompts and seeds in every cell, so cells compare
image by image; DINO and CLIP-I (against the subject's real images) and CLIP-T (against the prompt without the
identifier) per cell.

    python -m scripts.scale_sweep --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/.../export \\
        --instance-dir my_dog/ --class-noun dog --prompts "a {identifier} {class_noun} on the beach" \\
        --seeds 0 1 --guidance 3 7.5 --unet-scales 0 0.5 1 --te-scales 0 1 --out sweeps/dog

writes ``<out>/grid.png`` (the subject's photos, then a row per (UNet scale, text-encoder scale), a block of columns per
guidance scale: the prompts x seeds; each render enlarged or reduced to ``--cell-size`` and captioned with its guidance,
prompt number, seed and scores) and ``<out>/scores.csv`` (a row per cell: ``guidance_scale``, ``lora_unet_scale``,
``lora_text_encoder_scale``, ``dino``, ``clip_i``, ``clip_t``, ``images``). A full fine-tune's export is a base model
(``--base <export>/pipeline``, no ``--lora``); the LoRA scales then change nothing.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from callbacks import pictures
from callbacks.pictures import (
    DEFAULT_CELL_SIZE,
    Row,
    check_cell_size,
    compose,
    reference_row,
    save_png_atomic,
    score_chunks,
)
from core.errors import report_user_errors
from datamodules.images import check_image_folder, load_image
from datamodules.prompts import PROMPT_SETS, fill, resolve_templates
from metrics import load_clip, load_dino
from metrics.dreambench import SubjectScorer
from sd.export.folder import load_lora_file
from sd.export.layout import resolve_lora_file
from sd.models.loading import load_components
from sd.render.pipeline import SAMPLERS, build_pipeline
from sd.render.sampling import SamplingSettings, render

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Cell:
    guidance_scale: float
    lora_unet_scale: float
    lora_text_encoder_scale: float


def sweep_cells(guidance: list[float], unet_scales: list[float], te_scales: list[float]) -> list[Cell]:
    """Every combination, guidance varying fastest (the grid's columns)."""
    return [Cell(g, u, t) for u, t, g in itertools.product(unet_scales, te_scales, guidance)]


def run_sweep(
    pipe,
    prompts: list[str],
    seeds: list[int],
    cells: list[Cell],
    settings: SamplingSettings,
    size: tuple[int, int],
    scorer: SubjectScorer,
) -> tuple[list[dict], list[dict]]:
    """Render and score each cell; return (one score row per cell, one record per image: ``image``, ``cell``,
    ``prompt_number`` (1-based), ``seed`` and per-image ``scores``)."""
    rows, records = [], []
    batch_prompts = [p for p in prompts for _ in seeds]  # (P * S,)
    batch_seeds = [s for _ in prompts for s in seeds]
    numbers = [i + 1 for i in range(len(prompts)) for _ in seeds]
    for cell in cells:
        cell_settings = replace(
            settings,
            guidance_scale=cell.guidance_scale,
            lora_scale=cell.lora_unet_scale,
            lora_text_encoder_scale=cell.lora_text_encoder_scale,
        )
        images = render(pipe, batch_prompts, batch_seeds, cell_settings, *size)  # (P * S, 3, H, W) in [0, 1]
        scorer.reset()
        per_image = scorer.update(images, batch_prompts, [0] * len(images), [False] * len(images))
        scores = {k: v for k, v in scorer.compute().items() if k in ("dino", "clip_i", "clip_t")}
        rows.append({**vars(cell), **scores, "images": len(images)})
        pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        for k, image in enumerate(pixels):
            records.append(
                {
                    "image": np.array(image, copy=True),
                    "cell": cell,
                    "prompt_number": numbers[k],
                    "seed": batch_seeds[k],
                    "scores": {name: float(per_image[name][k]) for name in ("dino", "clip_i", "clip_t")},
                }
            )
    return rows, records


def sweep_rows(rows: list[dict], records: list[dict]) -> list[Row]:
    """A picture row per (UNet scale, text-encoder scale), labelled with its cells' mean scores; its cells are the
    renders of each guidance scale in turn, each captioned with its guidance, prompt number, seed and scores."""
    out = []
    for unet, te in dict.fromkeys((c.lora_unet_scale, c.lora_text_encoder_scale) for c in (r["cell"] for r in records)):
        means = [
            f"CFG {r['guidance_scale']:g}: dino {r['dino']:.3f}, clip-t {r['clip_t']:.3f}"
            for r in rows
            if (r["lora_unet_scale"], r["lora_text_encoder_scale"]) == (unet, te)
        ]
        cells = [
            pictures.Cell(
                r["image"],
                [f"CFG {r['cell'].guidance_scale:g}", f"prompt {r['prompt_number']}", f"seed {r['seed']}"]
                + score_chunks(r["scores"]),
            )
            for r in records
            if (r["cell"].lora_unet_scale, r["cell"].lora_text_encoder_scale) == (unet, te)
        ]
        out.append(Row(f"LoRA UNet {unet:g}, text encoder {te:g} | " + " | ".join(means), cells))
    return out


def write_scores(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.scale_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model: hub id, diffusers folder or builtin:tiny-sd")
    p.add_argument("--lora", help="LoRA export folder (or its pytorch_lora_weights.safetensors)")
    p.add_argument("--instance-dir", required=True, help="the subject's real images (for DINO and CLIP-I)")
    p.add_argument("--out", required=True, type=Path, help="folder for grid.png and scores.csv")
    p.add_argument("--prompts", nargs="+", default=["default"], help=f"templates, or one set: {sorted(PROMPT_SETS)}")
    p.add_argument("--identifier", default="sks", help="the rare token; removed from prompts for CLIP-T")
    p.add_argument("--class-noun", default="", help="fills {class_noun} in the prompts")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0, 5.0, 7.5])
    p.add_argument("--unet-scales", nargs="+", type=float, default=[0.5, 0.75, 1.0])
    p.add_argument("--te-scales", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpm++")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dino", default="facebook/dino-vits16", help="DINO encoder (builtin:tiny-dino offline)")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip model (builtin:tiny-clip offline)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag; 'none' for none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16" if torch.cuda.is_available() else "float32")
    p.add_argument("--cell-size", type=int, default=DEFAULT_CELL_SIZE, help="pixels per grid cell (at least 128)")
    args = p.parse_args(argv)
    try:
        check_cell_size(args.cell_size, "--cell-size")
    except ValueError as e:
        p.error(str(e))
    if args.lora:
        try:
            resolve_lora_file(args.lora, "--lora")  # before any model loads
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    templates = resolve_templates(args.prompts[0] if args.prompts[0] in PROMPT_SETS else args.prompts, "--prompts")
    prompts = [fill(t, args.identifier, args.class_noun).strip() for t in templates]
    photos = check_image_folder(args.instance_dir, "--instance-dir")
    references = [pil_to_tensor(load_image(p)).float() / 255 for p in photos]
    settings = SamplingSettings(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        sampler=args.sampler,
        height=args.height,
        width=args.width,
    )
    parts = load_components(args.base)
    if args.lora:
        load_lora_file(parts.unet, parts.text_encoder, args.lora, text_encoder_2=parts.text_encoder_2)
    for model in (parts.unet, *parts.text_encoder_list(), parts.vae):  # SDXL: both text encoders
        model.to(args.device, DTYPES[args.dtype]).eval()
    pipe = build_pipeline(parts, args.sampler)
    clip_pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    scorer = SubjectScorer(
        load_dino(args.dino), load_clip(args.clip, clip_pretrained), references, args.identifier, pres=False
    )
    scorer.to(args.device)
    cells = sweep_cells(args.guidance, args.unet_scales, args.te_scales)
    rows, records = run_sweep(pipe, prompts, args.seeds, cells, settings, (args.height, args.width), scorer)
    args.out.mkdir(parents=True, exist_ok=True)
    write_scores(args.out / "scores.csv", rows)
    title = [
        f"scale sweep: columns = guidance {', '.join(f'{g:g}' for g in args.guidance)} x {len(prompts)} prompts x "
        f"seeds {', '.join(map(str, args.seeds))}; a row per LoRA scale pair",
        *(f"prompt {i + 1}: {prompt}" for i, prompt in enumerate(prompts)),
        f"{args.sampler}, {args.steps} steps, {args.width}x{args.height} px | model {args.base}"
        + (f" + LoRA {args.lora}" if args.lora else ""),
    ]
    subject = reference_row(photos, min(args.height, args.width))
    picture = compose(title, [subject, *sweep_rows(rows, records)], args.cell_size)
    save_png_atomic(picture, args.out / "grid.png")
    best = max(rows, key=lambda r: r["dino"])
    print(f"Wrote {args.out / 'grid.png'} and {args.out / 'scores.csv'} ({len(rows)} cells); best DINO: {best}")
    return rows


if __name__ == "__main__":
    sys.exit(report_user_errors(main))  # a bad file or option: `error: ...`, status 2
