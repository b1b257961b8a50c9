"""Generating the class (prior-preservation) images with the base model, Lightning-free.

Resumable and reproducible: image ``class_{i:05d}.png`` always comes from the seed ``seed + i``, each image is
written atomically, and a second call only makes the images that are missing. The folder's
``class_images.json`` records the prompt and model that made its images, so a changed prompt or model is
noticed instead of silently mixing two priors.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datamodules.images import list_images, save_image_atomic

log = logging.getLogger(__name__)

RECORD_NAME = "class_images.json"


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def read_record(class_dir: str | Path) -> dict[str, Any] | None:
    """The folder's generation record, or None when there is none (or it is unreadable)."""
    path = Path(class_dir) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("Ignoring the unreadable class-image record %s (%s).", path, e)
        return None


def _write_record(class_dir: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{RECORD_NAME}.", suffix=".tmp", dir=class_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, class_dir / RECORD_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _warn_if_made_differently(class_dir: Path, record: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Warn when images still in the folder were made from another prompt or model than ``settings`` name."""
    if record is None:
        return
    present = {p.name for p in list_images(class_dir)}
    for entry in [record, *record.get("earlier", [])]:
        names = [n for n in entry.get("images", []) if n in present]
        differs = [k for k in ("class_prompt", "pretrained_model_name_or_path") if entry.get(k) != settings[k]]
        if names and differs:
            log.warning(
                "%d class images in %s were made by another prompt/model (%s) than now (%s). They are kept and used; "
                "to regenerate them, remove them or point data.class_data_dir at a new folder.",
                len(names),
                class_dir,
                ", ".join(f"{k}={entry.get(k)!r}" for k in differs),
                ", ".join(f"{k}={settings[k]!r}" for k in differs),
            )


def _updated_record(record: dict[str, Any] | None, settings: dict[str, Any], new_images: list[str]) -> dict[str, Any]:
    """The record with ``new_images`` added under ``settings``; earlier settings move to ``earlier``."""
    if record is None:
        return {**settings, "images": new_images, "earlier": []}
    earlier = list(record.get("earlier", []))
    latest = {k: v for k, v in record.items() if k != "earlier"}
    if all(latest.get(k) == v for k, v in settings.items()):
        return {**latest, "images": sorted(set(latest.get("images", [])) | set(new_images)), "earlier": earlier}
    return {**settings, "images": new_images, "earlier": [*earlier, latest]}


def generate_class_images(
    pretrained_model_name_or_path: str,
    class_prompt: str,
    class_dir: str | Path,
    num_class_images: int,
    resolution: int,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
) -> int:
    """Top ``class_dir`` up to ``num_class_images`` images of ``class_prompt`` made by the base model.

    Images already in the folder (any name) count. When enough exist no model is loaded. Otherwise the
    pipeline is loaded once (float16 on CUDA, float32 on CPU) with a DPM-Solver++ sampler and the missing
    images ``class_{i:05d}.png`` are made in batches, each from its own seed ``seed + i``, so the result does
    not depend on ``batch_size`` or on being interrupted and resumed.

    Args:
        pretrained_model_name_or_path: The base model (hub id, diffusers folder, or ``builtin:<name>``).
        class_prompt: The prompt of the class images, e.g. ``"a photo of dog"``.
        class_dir: Folder of the class images; created if missing.
        num_class_images: How many images the folder should hold.
        resolution: Side of the square images, in pixels (a multiple of 8).
        batch_size: Images per pipeline call.
        num_inference_steps: Sampler steps per image.
        guidance_scale: Classifier-free guidance scale (<= 1 disables guidance).
        seed: Image ``i`` uses the seed ``seed + i``.
        revision: Hub revision of the base model.
        variant: Weight-file variant of the base model, e.g. ``fp16``.
        device: Device to generate on; defaults to ``cuda`` when available, else ``cpu``.
        single_file_config: Configs (diffusers folder or hub id) of a single-file base model.

    Returns:
        The number of images made.
    """
    if num_class_images < 0 or batch_size <= 0 or num_inference_steps <= 0:
        raise ValueError("num_class_images must be >= 0, batch_size and num_inference_steps > 0.")
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}.")
    class_dir = Path(class_dir).expanduser()
    class_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "class_prompt": class_prompt,
        "pretrained_model_name_or_path": pretrained_model_name_or_path,
        "revision": revision,
        "variant": variant,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "seed": seed,
        "scheduler": "DPMSolverMultistepScheduler",
    }
    record = read_record(class_dir)
    _warn_if_made_differently(class_dir, record, settings)

    present = {p.name for p in list_images(class_dir)}
    missing = num_class_images - len(present)
    if missing <= 0:
        return 0
    todo: list[int] = []  # indices of the images to make: the lowest free ones
    index = 0
    while len(todo) < missing:
        if class_image_name(index) not in present:
            todo.append(index)
        index += 1
    # Recorded before generating, so images of an interrupted run are accounted for too.
    _write_record(class_dir, _updated_record(record, settings, [class_image_name(i) for i in todo]))

    from diffusers import DPMSolverMultistepScheduler

    from lightning_modules.sd_loading import load_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    log.info("Generating %d class images of %r in %s on %s.", len(todo), class_prompt, class_dir, device)
    pipe = load_pipeline(pretrained_model_name_or_path, revision, variant, dtype, single_file_config=single_file_config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    do_cfg = guidance_scale > 1.0
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(class_prompt, device, 1, do_cfg)  # (1, 77, D) each
    latent_side = resolution // pipe.vae_scale_factor
    latent_shape = (1, pipe.unet.config.in_channels, latent_side, latent_side)

    made = 0
    with tqdm(total=len(todo), desc="Generating class images", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            # Initial noise per image from its own CPU generator: identical on any device and for any batch size.
            latents = torch.cat(
                [torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed + i)) for i in chunk]
            ).to(device, dtype)  # (b, 4, h, w)
            images = pipe(
                prompt_embeds=prompt_embeds.repeat(len(chunk), 1, 1),  # (b, 77, D)
                negative_prompt_embeds=negative_embeds.repeat(len(chunk), 1, 1) if do_cfg else None,
                latents=latents,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            ).images
            for i, image in zip(chunk, images, strict=True):
                save_image_atomic(image, class_dir / class_image_name(i))
                made += 1
            bar.update(len(chunk))
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return made
