"""Render a labelled grid of world prompts with the pretrained toy model (the README's picture of it).

    python -m scripts.toy_samples --out docs/toy_world_samples.png [--images 4] [--steps 25] [--guidance 5]

Each row is one prompt, rendered with fixed seeds through the same loading and sampling code as training's
validation (``builtin:toy-sd``, DPM-Solver++); the first column is a real world image with that caption's content.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from core.errors import report_user_errors
from datamodules.images import save_image_atomic
from sd.models.loading import load_components
from sd.render.pipeline import build_pipeline
from sd.render.sampling import SamplingSettings, image_seed, render

PROMPTS = (
    "a red ball",
    "a large blue box on the left",
    "a yellow star, striped pink wall",
    "a small green ring on the right",
    "a purple cup, plain light blue wall",
    "a ball",
)
LABEL = 14


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.toy_samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="builtin:toy-sd")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scale", type=int, default=3, help="pixel magnification of the 32 px renders")
    args = parser.parse_args(argv)
    parts = load_components(args.model)
    pipe = build_pipeline(parts, "dpm++")
    settings = SamplingSettings(num_inference_steps=args.steps, guidance_scale=args.guidance)
    side = 32 * args.scale
    width = 300 + side * args.images
    sheet = Image.new("RGB", (width, len(PROMPTS) * (side + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            seeds = [image_seed(row, j) for j in range(args.images)]
            images = render(pipe, [prompt] * args.images, seeds, settings, 32, 32)  # (N, 3, 32, 32) in [0, 1]
            y = row * (side + 4)
            draw.text((6, y + side // 2 - LABEL // 2), prompt, fill="black")
            for j, image in enumerate(images):
                array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                tile = Image.fromarray(array).resize((side, side), Image.Resampling.NEAREST)
                sheet.paste(tile, (300 + j * side, y))
    save_image_atomic(sheet, args.out)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    sys.exit(report_user_errors(main))  # a bad file or option: `error: ...`, status 2
