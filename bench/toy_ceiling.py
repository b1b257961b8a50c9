"""What the toy world can show: the ceiling and the floor that every toy quality figure is read against.

    python bench/toy_ceiling.py [--subjects 5] [--class-images 8] [--out bench/results/cpu_toy_ceiling.md]

For the demo subject (drawn by ``datamodules.toy_subject`` at the toy model's 32 px), scored with the toy encoders
(``builtin:toy-dino``, ``builtin:toy-clip``) as validation scores renders, mean cosine similarity of:

- real vs real: the subject's photos against each other (distinct pairs): the DreamBooth paper's "real images" row,
  the best a render can reach;
- VAE reconstruction vs real: each photo encoded and decoded by the toy model's VAE, against every photo (all
  pairs): the most that a model working in that VAE's latents can show, whatever it learns;
- generic class vs real: the base model's images of the class prompt ("a ball"), made as class images are
  (DPM-Solver++, the demo's steps and guidance), against the photos: what no learning at all gives.

A fine-tuned model's toy DINO is then read as a fraction of the span between the last row and the first, and is
bounded by the second. Nothing here trains; a run takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine  # noqa: E402

TOY_MODEL = "builtin:toy-sd"


def mean_similarity(a: torch.Tensor, b: torch.Tensor, distinct: bool) -> float:
    """Mean cosine similarity of unit embeddings ``a`` (N, D) and ``b`` (M, D); ``distinct`` leaves out the diagonal
    (``a`` and ``b`` the same set)."""
    sims = a @ b.T  # (N, M)
    if distinct:
        n = sims.shape[0]
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
    return float(sims.mean())


def vae_reconstructions(images: torch.Tensor, model: str = TOY_MODEL) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] through the model's VAE (the mean of the latent distribution) and back."""
    from sd.models.loading import load_parts

    vae = load_parts(model, ["vae"])["vae"].eval()
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mean
        return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def class_images(folder: Path, prompt: str, count: int, resolution: int, steps: int, guidance: float) -> torch.Tensor:
    """The base model's images of ``prompt``, made as the data module makes class images, as (N, 3, H, W)."""
    from datamodules.class_images import generate_class_images
    from datamodules.images import list_images, load_image

    generate_class_images(TOY_MODEL, prompt, folder, count, resolution, num_inference_steps=steps,
                          guidance_scale=guidance)  # fmt: skip
    return _stack([load_image(p) for p in list_images(folder)])


def _stack(images) -> torch.Tensor:
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in images])  # fmt: skip


def measure(num_photos: int, num_class: int, resolution: int, steps: int, guidance: float, seed: int) -> list[dict]:
    from datamodules.images import list_images, load_image
    from datamodules.toy_subject import draw_toy_subject
    from metrics.encoders import TOY_CLIP, TOY_DINO, load_clip, load_dino

    encoders = {"DINO": load_dino(TOY_DINO), "CLIP-I": load_clip(TOY_CLIP)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        draw_toy_subject(tmp / "subject", num_images=num_photos, resolution=resolution, seed=seed)
        photos = _stack([load_image(p) for p in list_images(tmp / "subject")])
        sets = {
            "real vs real": (photos, True),
            "VAE reconstruction vs real": (vae_reconstructions(photos), False),
            "generic class vs real": (
                class_images(tmp / "class", "a ball", num_class, resolution, steps, guidance),
                False,
            ),
        }
        rows = []
        for what, (images, distinct) in sets.items():
            row = {"what": what, "images": len(images)}
            for name, encoder in encoders.items():
                row[name] = mean_similarity(encoder(images), encoder(photos), distinct)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=5, help="photos of the demo subject (the demo draws 5)")
    parser.add_argument("--class-images", type=int, default=8, help="generic class images (the demo makes 8)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="class images' inference steps (the demo's)")
    parser.add_argument("--guidance", type=float, default=7.5, help="class images' guidance (the data module's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject's drawing (the demo's: 0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = measure(args.subjects, args.class_images, args.resolution, args.steps, args.guidance, args.seed)
    lines = [
        f"# bench/toy_ceiling.py: the demo subject at {args.resolution} px, builtin:toy-dino / builtin:toy-clip",
        "",
        f"{machine()}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s. Command: "
        f"`{' '.join(['python bench/toy_ceiling.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        "| what (against the subject's photos) | images | toy DINO | toy CLIP-I |",
        "|---|---:|---:|---:|",
        *(f"| {r['what']} | {r['images']} | {r['DINO']:.3f} | {r['CLIP-I']:.3f} |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        from core.safe_files import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
