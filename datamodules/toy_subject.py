"""A procedurally drawn toy subject for the demo and the tests: a teal-and-orange checkered ball with a yellow star.

Deterministic: the same ``seed`` gives the same images, byte for byte. Each image shows the one ball at another
position, size and checker phase, on another background (wall colour, floor colour and horizon height), the
way a set of photos of one object varies. A :class:`ToyLook` draws other balls the same way (other colours, stripes
or no pattern, a dot or no emblem: ``bench/toy_dreambench.py``'s subjects); the default is the demo's ball.

    python -m datamodules.toy_subject --out demo_data/toy_subject [--num-images 5] [--resolution 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from core.errors import ConfigError, report_user_errors
from datamodules.images import save_image_atomic

TEAL = (0, 150, 150)
ORANGE = (250, 120, 20)
YELLOW = (255, 220, 0)
STAR_EDGE = (120, 70, 0)
WALLS = [(225, 230, 240), (240, 225, 205), (205, 225, 205), (235, 210, 225), (200, 210, 230), (245, 240, 220)]
FLOORS = [(150, 120, 95), (110, 110, 120), (170, 160, 140), (95, 125, 95), (160, 140, 160), (120, 100, 80)]
SUPERSAMPLE = 4  # drawn at 4x and downsampled, for smooth edges

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ToyLook:
    """What the ball looks like; the default is the demo's ball. Every look makes the same random draws, so a
    photo of another look has the ball where the demo's photo of the same ``rng`` has it.

    Args:
        colours: The pattern's two colours (``plain``: the first only).
        pattern: ``checker`` (the demo's), ``stripes`` (horizontal bands of the checker's cell height) or ``plain``.
        emblem: ``star`` (the demo's), ``dot`` (a disc where the star's centre is) or ``none``.
        emblem_colour: The emblem's fill; ``emblem_edge`` its rim.
        cells: The ball's radius in pattern cells (the demo's: 1.0, checks 7-11 px wide at 32 px).
    """

    colours: tuple[RGB, RGB] = (TEAL, ORANGE)
    pattern: Literal["checker", "stripes", "plain"] = "checker"
    emblem: Literal["star", "dot", "none"] = "star"
    emblem_colour: RGB = YELLOW
    emblem_edge: RGB = STAR_EDGE
    cells: float = 1.0


# Checks as wide as the ball's radius survive the toy VAE's 8 x 8 latents (bench/results/cpu_toy_ceiling.md: the
# reconstructions' toy DINO within 0.05 of the photos' own); the checks of before (2.2 cells, ~4 px at 32 px: one
# latent pixel) came back as blobs.
DEMO_LOOK = ToyLook()
# The toy subjects: the demo's ball and the others of bench/toy_dreambench.py and bench/toy_ceiling.py.
TOY_SUBJECTS = {
    "checker": DEMO_LOOK,
    "bee": ToyLook(colours=((255, 200, 0), (30, 30, 30)), pattern="stripes", emblem="none", cells=1.2),
    "berry": ToyLook(
        colours=((130, 40, 170), (130, 40, 170)),
        pattern="plain",
        emblem="dot",
        emblem_colour=(250, 250, 250),
        emblem_edge=(60, 20, 80),
    ),  # fmt: skip
    "candy": ToyLook(colours=((215, 30, 40), (250, 250, 250)), emblem="none"),  # its blue star was lost in the latents
}


def _star(cx: float, cy: float, outer: float, inner: float, turn: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = turn + k * math.pi / 5 - math.pi / 2
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_toy_image(resolution: int, rng: random.Random, look: ToyLook = DEMO_LOOK) -> Image.Image:
    """One image of the toy ball, with position, size, checker phase and background drawn from ``rng``."""
    return draw_toy_photo_and_mask(resolution, rng, look=look)[0]


def draw_toy_photo_and_mask(
    resolution: int,
    rng: random.Random,
    wall: tuple[int, int, int] | None = None,
    striped: bool = False,
    look: ToyLook = DEMO_LOOK,
) -> tuple[Image.Image, Image.Image]:
    """:func:`draw_toy_image` and the ball's mask (8-bit grayscale, white on the ball). ``wall`` replaces the drawn
    wall colour and ``striped`` draws the toy world's stripes on it (``datamodules.toy_world``); the random draws
    are the same either way, so the ball is where it is in the plain image. ``look``: the ball's colours, pattern
    and emblem."""
    s = resolution * SUPERSAMPLE
    drawn_wall, floor = rng.choice(WALLS), rng.choice(FLOORS)
    wall = wall or drawn_wall
    horizon = int(s * rng.uniform(0.45, 0.7))
    img = Image.new("RGB", (s, s), wall)
    draw = ImageDraw.Draw(img)
    if striped:  # as the toy world draws a striped wall
        stripe = s // 8
        shade = tuple(int(c * 0.78) for c in wall)
        for x in range(0, s, 2 * stripe):
            draw.rectangle([x, 0, x + stripe - 1, horizon], fill=shade)
    draw.rectangle([0, horizon, s, s], fill=floor)

    radius = s * rng.uniform(0.22, 0.34)
    cx = s * rng.uniform(0.5 - 0.45 + radius / s, 0.5 + 0.45 - radius / s)
    cy = min(horizon + s * rng.uniform(-0.05, 0.2), s - radius * 1.05) - radius * 0.25
    cy = max(cy, radius * 1.05)
    # Soft shadow on the floor under the ball.
    shadow = (max(0, floor[0] - 45), max(0, floor[1] - 45), max(0, floor[2] - 45))
    draw.ellipse([cx - radius, cy + radius * 0.8, cx + radius, cy + radius * 1.1], fill=shadow)

    # Checker pattern (or the look's), masked by the ball's disc.
    cell = radius / look.cells
    phase_x, phase_y = rng.uniform(0, cell), rng.uniform(0, cell)
    first, second = look.colours
    checker = Image.new("RGB", (s, s), first)
    cdraw = ImageDraw.Draw(checker)
    x0, y0 = cx - radius - phase_x, cy - radius - phase_y
    for row in range(int(2 * radius / cell) + 3):
        for col in range(int(2 * radius / cell) + 3):
            if look.pattern == "checker" and (row + col) % 2 or look.pattern == "stripes" and row % 2:
                x, y = x0 + col * cell, y0 + row * cell
                cdraw.rectangle([x, y, x + cell, y + cell], fill=second)
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    img.paste(checker, (0, 0), mask)
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=(40, 40, 40), width=max(1, s // 128))

    # The yellow star, slightly off-centre like a printed logo, with a dark rim.
    star_cx = cx + radius * rng.uniform(-0.2, 0.2)
    star_cy = cy + radius * rng.uniform(-0.2, 0.1)
    turn = rng.uniform(-0.3, 0.3)  # drawn whatever the emblem, so every look makes the same draws
    if look.emblem == "star":
        star = _star(star_cx, star_cy, radius * 0.55, radius * 0.23, turn)
        draw.polygon(star, fill=look.emblem_colour, outline=look.emblem_edge, width=max(1, s // 160))
    elif look.emblem == "dot":
        r = radius * 0.32
        box = [star_cx - r, star_cy - r, star_cx + r, star_cy + r]
        draw.ellipse(box, fill=look.emblem_colour, outline=look.emblem_edge, width=max(1, s // 160))
    # A highlight that makes it read as a sphere.
    hx, hy, hr = cx - radius * 0.45, cy - radius * 0.5, radius * 0.13
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255))
    size = (resolution, resolution)
    return img.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.LANCZOS)


def draw_toy_subject(
    out_dir: str | Path, num_images: int = 5, resolution: int = 64, seed: int = 0, look: ToyLook = DEMO_LOOK
) -> list[Path]:
    """Write ``num_images`` images of the toy ball into ``out_dir`` as ``toy_{i:02d}.png``; return their paths.

    Args:
        out_dir: Folder to write to; created if missing. Existing files of the same names are replaced.
        num_images: How many images to draw.
        resolution: Side of the square images, in pixels.
        seed: Seed of the variations; the same seed gives the same images.
        look: The ball's colours, pattern and emblem (default: the demo's ball).
    """
    if num_images <= 0 or resolution <= 0:
        raise ConfigError(f"num_images and resolution must be positive, got {num_images} and {resolution}.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        rng = random.Random(seed * 1_000_003 + i)  # one stream per image: image i does not depend on num_images
        paths.append(save_image_atomic(draw_toy_image(resolution, rng, look), out / f"toy_{i:02d}.png"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.toy_subject",
        description="Draw the demo's toy subject: a teal-and-orange checkered ball with a yellow star.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the images to")
    parser.add_argument("--num-images", type=int, default=5, help="how many images (default 5)")
    parser.add_argument("--resolution", type=int, default=64, help="side of the square images in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the variations (default 0)")
    args = parser.parse_args(argv)
    if args.num_images <= 0 or args.resolution <= 0:
        parser.error("--num-images and --resolution must be positive")
    for path in draw_toy_subject(args.out, args.num_images, args.resolution, args.seed):
        print(path)


if __name__ == "__main__":
    sys.exit(report_user_errors(main))  # a bad file or option: `error: ...`, status 2
