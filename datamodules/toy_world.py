"""A procedural, captioned image world for pretraining a toy Stable Diffusion on a CPU.

Each image shows one object of a class (ball, box, ring, star, cup) in one solid colour, small or large, on the
left, in the middle or on the right, in front of a wall (plain or striped, in a named colour) over a floor. Its
caption names what it shows, with some attributes left out at random, so that short prompts ("a red ball", "a
ball") are in the world too. Deterministic: item ``i`` of seed ``s`` is the same image and caption everywhere.

No caption describes a pattern on an object, and no object is teal or orange: the demo's subject (a teal-and-orange
checkered ball, :mod:`datamodules.toy_subject`) is a look the pretrained model has never been shown.

    python -m datamodules.toy_world --out toy_world_samples --num-images 16 --resolution 32
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.images import save_image_atomic

CLASSES = ("ball", "box", "ring", "star", "cup")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 25),
    "purple": (135, 55, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = {"small": (0.13, 0.17), "large": (0.24, 0.3)}  # radius as a fraction of the image side
POSITIONS = {"on the left": 0.28, "in the middle": 0.5, "on the right": 0.72}  # centre x as a fraction
WALLS = {
    "white": (232, 232, 228),
    "gray": (150, 150, 155),
    "pink": (235, 185, 200),
    "light blue": (175, 205, 235),
    "beige": (225, 205, 170),
}
WALL_PATTERNS = ("plain", "striped")
FLOORS = [(150, 120, 95), (110, 110, 120), (170, 160, 140), (95, 125, 95), (120, 100, 80)]
SUPERSAMPLE = 4  # drawn at 4x and downsampled, for smooth edges


@dataclass(frozen=True)
class Scene:
    """What one image shows; :meth:`caption` names it."""

    cls: str
    colour: str
    size: str
    position: str
    wall: str
    wall_pattern: str
    floor: tuple[int, int, int]
    horizon: float  # fraction of the image height
    jitter: tuple[float, float, float]  # size within its range, x and y offsets, each in [0, 1)
    keep: tuple[bool, bool, bool]  # whether the caption names the size, the position, the wall

    def caption(self) -> str:
        size = f"{self.size} " if self.keep[0] else ""
        text = f"a {size}{self.colour} {self.cls}"
        if self.keep[1]:
            text += f" {self.position}"
        if self.keep[2]:
            text += f", {self.wall_pattern} {self.wall} wall"
        return text


def sample_scene(rng: random.Random) -> Scene:
    return Scene(
        cls=rng.choice(CLASSES),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        wall=rng.choice(list(WALLS)),
        wall_pattern=rng.choice(WALL_PATTERNS),
        floor=rng.choice(FLOORS),
        horizon=rng.uniform(0.55, 0.72),
        jitter=(rng.random(), rng.random(), rng.random()),
        keep=(rng.random() < 0.6, rng.random() < 0.6, rng.random() < 0.6),
    )


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = k * math.pi / 5 - math.pi / 2
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, r: float, colour) -> None:
    edge, dark, light = _shade(colour, 0.55), _shade(colour, 0.75), _shade(colour, 1.25)
    width = max(1, int(r / 10))
    if cls == "ball":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=edge, width=width)
        hr = r * 0.22
        draw.ellipse([cx - r * 0.45 - hr, cy - r * 0.45 - hr, cx - r * 0.45 + hr, cy - r * 0.45 + hr], fill=light)
    elif cls == "box":
        top = r * 0.35  # a cube seen slightly from above: front face and a darker top face
        draw.polygon([(cx - r, cy - r + top), (cx - r + top, cy - r), (cx + r, cy - r), (cx + r - top, cy - r + top)],
                     fill=light, outline=edge)  # fmt: skip
        draw.rectangle([cx - r, cy - r + top, cx + r - top, cy + r], fill=colour, outline=edge, width=width)
        draw.polygon([(cx + r - top, cy - r + top), (cx + r, cy - r), (cx + r, cy + r - top), (cx + r - top, cy + r)],
                     fill=dark, outline=edge)  # fmt: skip
    elif cls == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r * 0.4)))
    elif cls == "star":
        draw.polygon(_star(cx, cy, r * 1.1, r * 0.45), fill=colour, outline=edge)
    elif cls == "cup":
        body = [
            (cx - r * 0.75, cy - r * 0.8),
            (cx + r * 0.55, cy - r * 0.8),
            (cx + r * 0.4, cy + r),
            (cx - r * 0.6, cy + r),
        ]
        draw.ellipse(
            [cx + r * 0.2, cy - r * 0.45, cx + r * 1.05, cy + r * 0.45], outline=colour, width=max(2, int(r * 0.22))
        )
        draw.polygon(body, fill=colour, outline=edge)
        draw.ellipse([cx - r * 0.75, cy - r * 0.95, cx + r * 0.55, cy - r * 0.65], fill=dark, outline=edge)
    else:
        raise ValueError(f"unknown class {cls!r}; the world has {CLASSES}")


def draw_scene(scene: Scene, resolution: int) -> Image.Image:
    s = resolution * SUPERSAMPLE
    wall = WALLS[scene.wall]
    img = Image.new("RGB", (s, s), wall)
    draw = ImageDraw.Draw(img)
    horizon = int(s * scene.horizon)
    if scene.wall_pattern == "striped":
        stripe = s // 8
        for x in range(0, s, 2 * stripe):
            draw.rectangle([x, 0, x + stripe - 1, horizon], fill=_shade(wall, 0.78))
    draw.rectangle([0, horizon, s, s], fill=scene.floor)
    lo, hi = SIZES[scene.size]
    r = s * (lo + (hi - lo) * scene.jitter[0])
    cx = s * POSITIONS[scene.position] + s * 0.08 * (scene.jitter[1] - 0.5)
    cy = min(horizon + s * 0.1 * scene.jitter[2], s - r * 1.05) - r * 0.3
    cy = max(cy, r * 1.1)
    draw.ellipse([cx - r, cy + r * 0.75, cx + r, cy + r * 1.05], fill=_shade(scene.floor, 0.7))  # shadow
    _draw_object(draw, scene.cls, cx, cy, r, COLOURS[scene.colour])
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def world_item(seed: int, index: int, resolution: int = 32) -> tuple[Image.Image, str, Scene]:
    """Item ``index`` of the world of ``seed``: its image, caption and scene."""
    scene = sample_scene(random.Random(seed * 1_000_003 + index))
    return draw_scene(scene, resolution), scene.caption(), scene


def world_arrays(seed: int, count: int, resolution: int = 32) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` items as a uint8 array (count, H, W, 3), their captions and scenes."""
    images, captions, scenes = [], [], []
    for i in range(count):
        image, caption, scene = world_item(seed, i, resolution)
        images.append(np.asarray(image))
        captions.append(caption)
        scenes.append(scene)
    return np.stack(images), captions, scenes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.toy_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.num_images):
        image, caption, _ = world_item(args.seed, i, args.resolution)
        save_image_atomic(image, args.out / f"{i:05d}.png")
        lines.append(f"{i:05d}.png\t{caption}")
    (args.out / "captions.tsv").write_text("\n".join(lines) + "\n")
    print(f"Wrote {args.num_images} images and captions.tsv to {args.out}")


if __name__ == "__main__":
    main()
