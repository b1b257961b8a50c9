"""A procedural, captioned image world for pretraining a toy Stable Diffusion on a CPU.

Each image shows one object of a class (ball, box, ring, star, cup) in one solid colour, small or large, on the
left, in the middle or on the right, in front of a wall (plain or striped, in a named colour) over a floor. Its
caption names what it shows, with some attributes left out at random, so that short prompts ("a red ball", "a
ball") are in the world too. Deterministic: item ``i`` of seed ``s`` is the same image and caption everywhere.

Objects may carry a pattern in a second colour of the world (checks, stripes or dots, ``pattern_prob`` of them), as
real objects do; no caption names a pattern, and no object of the world is teal or orange: the demo's subject (a
teal-and-orange checkered ball with a yellow star, :mod:`datamodules.toy_subject`) is a look the pretrained model has
never been shown, made of things it can draw. ``free_colours`` draws images for the VAE alone: any RGB colours, any
pattern, sometimes an emblem (a star or a dot), so that the autoencoder, like SD's, reconstructs looks the captioned
world does not have.

    python -m datamodules.toy_world --out toy_world_samples --num-images 16 --resolution 32
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, replace
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
PATTERNS = ("checker", "stripes", "dots")  # an object's pattern: never captioned
EMBLEMS = ("star", "dot")  # free-colour (VAE) images only
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
    pattern: str = "plain"  # plain or one of PATTERNS, in ``second`` over the object's colour; never captioned
    second: tuple[int, int, int] | None = None
    phase: tuple[float, float] = (0.0, 0.0)  # the pattern's offset, in cells
    rgb: tuple[int, int, int] | None = None  # free-colour images: the object's colour instead of COLOURS[colour]
    emblem: str = "none"  # free-colour images: none or one of EMBLEMS, in ``emblem_rgb``
    emblem_rgb: tuple[int, int, int] = (0, 0, 0)

    def caption(self) -> str:
        size = f"{self.size} " if self.keep[0] else ""
        text = f"a {size}{self.colour} {self.cls}"
        if self.keep[1]:
            text += f" {self.position}"
        if self.keep[2]:
            text += f", {self.wall_pattern} {self.wall} wall"
        return text


def sample_scene(rng: random.Random, pattern_prob: float = 0.0, free_colours: bool = False) -> Scene:
    """One scene. The draws of the captioned attributes come first and are the same whatever ``pattern_prob`` and
    ``free_colours`` are (so ``pattern_prob=0`` is the first world, item for item); the pattern's and the free
    colours' draws follow."""
    scene = Scene(
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
    if free_colours:

        def any_colour() -> tuple[int, int, int]:
            return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

        return replace(
            scene,
            pattern=rng.choice(("plain", *PATTERNS)),
            second=any_colour(),
            phase=(rng.random(), rng.random()),
            rgb=any_colour(),
            emblem=rng.choice(("none", *EMBLEMS)),
            emblem_rgb=any_colour(),
        )
    if pattern_prob > 0 and rng.random() < pattern_prob:
        second = rng.choice([c for c in COLOURS if c != scene.colour])
        return replace(scene, pattern=rng.choice(PATTERNS), second=COLOURS[second], phase=(rng.random(), rng.random()))
    return scene


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
    _draw_object(draw, scene.cls, cx, cy, r, scene.rgb or COLOURS[scene.colour])
    if scene.pattern != "plain":
        _draw_pattern(img, scene, cx, cy, r)
    if scene.emblem != "none":
        _draw_emblem(draw, scene, cx, cy, r)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _draw_pattern(img: Image.Image, scene: Scene, cx: float, cy: float, r: float) -> None:
    """``scene.second`` in checks, stripes or dots of cell ``r / 2.2`` (the demo subject's), over the object only."""
    s = img.width
    shape = Image.new("RGB", (s, s), (0, 0, 0))
    _draw_object(ImageDraw.Draw(shape), scene.cls, cx, cy, r, (255, 255, 255))
    on_object = shape.convert("L").point(lambda v: 255 if v > 100 else 0)
    cells = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(cells)
    cell = r / 2.2
    x0, y0 = cx - 1.3 * r - scene.phase[0] * cell, cy - 1.3 * r - scene.phase[1] * cell
    n = int(2.6 * r / cell) + 3
    for row in range(n):
        for col in range(n):
            x, y = x0 + col * cell, y0 + row * cell
            if scene.pattern == "checker" and (row + col) % 2:
                draw.rectangle([x, y, x + cell, y + cell], fill=255)
            elif scene.pattern == "stripes" and row % 2:
                draw.rectangle([x, y, x + cell, y + cell], fill=255)
            elif scene.pattern == "dots" and (row + col) % 2 == 0:
                draw.ellipse([x + cell * 0.2, y + cell * 0.2, x + cell * 0.8, y + cell * 0.8], fill=255)
    mask = Image.new("L", (s, s), 0)
    mask.paste(cells, (0, 0), on_object)
    img.paste(Image.new("RGB", (s, s), scene.second), (0, 0), mask)


def _draw_emblem(draw: ImageDraw.ImageDraw, scene: Scene, cx: float, cy: float, r: float) -> None:
    edge = _shade(scene.emblem_rgb, 0.5)
    if scene.emblem == "star":
        draw.polygon(_star(cx, cy, r * 0.55, r * 0.23), fill=scene.emblem_rgb, outline=edge)
    else:
        draw.ellipse([cx - r * 0.32, cy - r * 0.32, cx + r * 0.32, cy + r * 0.32], fill=scene.emblem_rgb, outline=edge)


def world_item(
    seed: int, index: int, resolution: int = 32, pattern_prob: float = 0.0, free_colours: bool = False
) -> tuple[Image.Image, str, Scene]:
    """Item ``index`` of the world of ``seed``: its image, caption and scene (see :func:`sample_scene`)."""
    scene = sample_scene(random.Random(seed * 1_000_003 + index), pattern_prob, free_colours)
    return draw_scene(scene, resolution), scene.caption(), scene


def _item_array(args: tuple) -> tuple[np.ndarray, str, Scene]:
    image, caption, scene = world_item(*args)
    return np.asarray(image), caption, scene


def world_arrays(
    seed: int,
    count: int,
    resolution: int = 32,
    pattern_prob: float = 0.0,
    free_colours: bool = False,
    processes: int = 1,
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` items as a uint8 array (count, H, W, 3), their captions and scenes; drawn by ``processes``
    processes (the same items whatever their number)."""
    jobs = [(seed, i, resolution, pattern_prob, free_colours) for i in range(count)]
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            items = pool.map(_item_array, jobs, chunksize=256)
    else:
        items = [_item_array(job) for job in jobs]
    return np.stack([a for a, _, _ in items]), [c for _, c, _ in items], [s for _, _, s in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.toy_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pattern-prob", type=float, default=0.5, help="objects with a pattern (the v2 world's 0.5)")
    parser.add_argument("--free-colours", action="store_true", help="the VAE's images: any colours and emblems")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.num_images):
        image, caption, _ = world_item(args.seed, i, args.resolution, args.pattern_prob, args.free_colours)
        save_image_atomic(image, args.out / f"{i:05d}.png")
        lines.append(f"{i:05d}.png\t{caption}")
    (args.out / "captions.tsv").write_text("\n".join(lines) + "\n")
    print(f"Wrote {args.num_images} images and captions.tsv to {args.out}")


if __name__ == "__main__":
    main()
