"""What the toy world can show: the ceiling and the floor that every toy quality figure is read against.

    python bench/toy_ceiling.py [--photos 5] [--class-images 8] [--subjects checker bee ...] [--out bench/results/cpu_toy_ceiling.md]

For each toy subject (``datamodules.toy_subject.TOY_SUBJECTS``: the demo's checkered ball and the toy DreamBench's
others, drawn at the toy model's 32 px), scored with the toy encoders (``builtin:toy-dino``, ``builtin:toy-clip``) as
validation scores renders, mean cosine similarity of:

- real vs real: the subject's photos against each other (distinct pairs): the DreamBooth paper's "real images" row,
  the best a render can reach;
- VAE reconstruction vs real: each photo encoded and decoded by the toy model's VAE, against every photo (all
  pairs): the most that a model working in that VAE's latents can show, whatever it learns;
- generic class vs real: the base model's images of the class prompt ("a ball"), made as class images are
  (DPM-Solver++, the demo's steps and guidance), against the photos: what no learning at all gives.

A fine-tuned model's toy DINO is then read as a fraction of the span between the last row and the first, and is
bounded by the second; the "gap" column is the first row minus the second. Nothing here trains; a run takes about a
minute on a 2-core CPU. ``DREAMBOOTH_TOY_WEIGHTS=<folder>`` measures another pretraining's weights.
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


def measure(
    num_photos: int, num_class: int, resolution: int, steps: int, guidance: float, seed: int, subjects: list[str]
) -> list[dict]:
    """One row per (subject, what); the generic class images are made once and scored against each subject."""
    from datamodules.images import list_images, load_image
    from datamodules.toy_subject import TOY_SUBJECTS, draw_toy_subject
    from metrics.encoders import TOY_CLIP, TOY_DINO, load_clip, load_dino

    encoders = {"DINO": load_dino(TOY_DINO), "CLIP-I": load_clip(TOY_CLIP)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generic = class_images(tmp / "class", "a ball", num_class, resolution, steps, guidance)
        for subject in subjects:
            folder = tmp / subject
            draw_toy_subject(
                folder, num_images=num_photos, resolution=resolution, seed=seed, look=TOY_SUBJECTS[subject]
            )
            photos = _stack([load_image(p) for p in list_images(folder)])
            sets = {
                "real vs real": (photos, True),
                "VAE reconstruction vs real": (vae_reconstructions(photos), False),
                "generic class vs real": (generic, False),
            }
            for what, (images, distinct) in sets.items():
                row = {"subject": subject, "what": what, "images": len(images)}
                for name, encoder in encoders.items():
                    row[name] = mean_similarity(encoder(images), encoder(photos), distinct)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    """One line per subject: the three rows' toy DINO and CLIP-I, and the reconstruction's gap to the ceiling."""
    lines = [
        "| subject | DINO real vs real | DINO VAE recon. | DINO gap | DINO generic class "
        "| CLIP-I real vs real | CLIP-I VAE recon. | CLIP-I generic class |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for subject in dict.fromkeys(r["subject"] for r in rows):
        real, recon, generic = (next(r for r in rows if r["subject"] == subject and r["what"] == w) for w in WHAT)
        lines.append(
            f"| {subject} | {real['DINO']:.3f} | {recon['DINO']:.3f} | {real['DINO'] - recon['DINO']:+.3f} "
            f"| {generic['DINO']:.3f} | {real['CLIP-I']:.3f} | {recon['CLIP-I']:.3f} | {generic['CLIP-I']:.3f} |"
        )
    return lines


WHAT = ("real vs real", "VAE reconstruction vs real", "generic class vs real")


def main(argv: list[str] | None = None) -> list[dict]:
    from datamodules.toy_subject import TOY_SUBJECTS
    from sd.models.toy import weights_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=5, help="photos of each subject (the demo draws 5)")
    parser.add_argument("--class-images", type=int, default=8, help="generic class images (the demo makes 8)")
    parser.add_argument("--subjects", nargs="+", choices=list(TOY_SUBJECTS), default=list(TOY_SUBJECTS))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="class images' inference steps (the demo's)")
    parser.add_argument("--guidance", type=float, default=7.5, help="class images' guidance (the data module's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subjects' drawing (the demo's: 0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = measure(args.photos, args.class_images, args.resolution, args.steps, args.guidance, args.seed, args.subjects)
    folder = weights_folder()
    lines = [
        f"# bench/toy_ceiling.py: the toy subjects at {args.resolution} px, toy DINO / CLIP-I of {folder.name}",
        "",
        f"{machine()}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s. Command: "
        f"`{' '.join(['python bench/toy_ceiling.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"Against each subject's {args.photos} photos: the photos among themselves (real vs real, the ceiling), the "
        f"toy VAE's reconstructions of them (the most a model in its latents can show; gap = ceiling minus this) and "
        f'{args.class_images} generic "a ball" images of the base model (the floor).',
        "",
        *table(rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        from core.safe_files import atomic_write_text

        atomic_write_text(args.out, text)
    return rows


if __name__ == "__main__":
    main()
