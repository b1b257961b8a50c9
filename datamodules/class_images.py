"""Generating the class (prior-preservation) images with the base model, Lightning-free.

Resumable and reproducible: image ``class_{i:05d}.png`` always comes from the seed ``seed + i``, each image is
written atomically, and a second call only makes the images that are missing. The folder's
``class_images.json`` records the prompt and model that made its images, so a changed prompt or model is
noticed instead of silently mixing two priors.

Fast: the class prompt is encoded once for all batches, batches are as large as fit (``batch_size="auto"``), the
sampler is DPM-Solver++ (2nd-order multistep; 20-25 steps suffice), and under DDP each rank makes its own share of
the missing images (:func:`shard_missing`).
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from core.safe_files import atomic_write_text
from datamodules.images import list_images, save_image_atomic

log = logging.getLogger(__name__)

RECORD_NAME = "class_images.json"
AUTO_MAX_BATCH = 32  # batch_size="auto" on CUDA starts here and halves on out-of-memory
AUTO_CPU_BATCH = 8  # batch_size="auto" on a CPU (an out-of-memory there kills the process instead of raising)


def shard_missing(missing_indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the missing image indices: every ``world_size``-th one, starting at ``rank``.

    The shares of all ranks are disjoint and together cover ``missing_indices``; their sizes differ by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(missing_indices[rank::world_size])


def missing_indices(present: set[str], num_class_images: int) -> list[int]:
    """Indices of the images to make so that the folder holds ``num_class_images``: the lowest free names."""
    todo: list[int] = []
    index = 0
    while len(todo) < num_class_images - len(present):
        if class_image_name(index) not in present:
            todo.append(index)
        index += 1
    return todo


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
    atomic_write_text(class_dir / RECORD_NAME, json.dumps(record, indent=2))


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
    batch_size: int | Literal["auto"] = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
    vae: str | None = None,
    rank: int = 0,
    world_size: int = 1,
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
        batch_size: Images per pipeline call, or ``"auto"``: on CUDA the largest that fits (from 32, halved on
            out-of-memory), on a CPU 8.
        num_inference_steps: Sampler steps per image.
        guidance_scale: Classifier-free guidance scale (<= 1 disables guidance).
        seed: Image ``i`` uses the seed ``seed + i``.
        revision: Hub revision of the base model.
        variant: Weight-file variant of the base model, e.g. ``fp16``.
        device: Device to generate on; defaults to ``cuda`` when available, else ``cpu``.
        single_file_config: Configs (diffusers folder or hub id) of a single-file base model.
        vae: Another VAE than the base model's (``model.vae``).
        rank: This process's rank when several generate together (DDP): it makes only its share of the missing
            images (:func:`shard_missing`); rank 0 writes the record. Every rank must call this function, and when
            ``torch.distributed`` is initialized the ranks wait for each other after listing the folder, so they
            agree on what is missing.
        world_size: How many processes generate together.

    Returns:
        The number of images made (by this rank).
    """
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}.")
    if num_class_images < 0 or num_inference_steps <= 0:
        raise ValueError("num_class_images must be >= 0 and num_inference_steps > 0.")
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

    all_todo = missing_indices({p.name for p in list_images(class_dir)}, num_class_images)
    _wait_for_all_ranks(world_size)  # every rank has listed the folder before any writes to it
    if not all_todo:
        return 0
    if rank == 0:  # recorded before generating, so images of an interrupted run are accounted for too
        _write_record(class_dir, _updated_record(record, settings, [class_image_name(i) for i in all_todo]))
    todo = shard_missing(all_todo, rank, world_size)
    if not todo:
        return 0

    from diffusers import DPMSolverMultistepScheduler

    from sd.models.loading import load_pipeline
    from sd.render.pipeline import prompt_embedding_kwargs

    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    log.info("Generating %d class images of %r in %s on %s.", len(todo), class_prompt, class_dir, device)
    pipe = load_pipeline(
        pretrained_model_name_or_path, revision, variant, dtype, single_file_config=single_file_config, vae=vae
    )  # the family's pipeline (SDXL: StableDiffusionXLPipeline, with its size conditioning at this resolution)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    do_cfg = guidance_scale > 1.0
    with torch.no_grad():  # (1, 77, D) each, and SDXL's pooled (1, P) embeddings
        embeds = prompt_embedding_kwargs(
            pipe.encode_prompt(
                prompt=class_prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
            )
        )
    latent_side = resolution // pipe.vae_scale_factor
    latent_shape = (1, pipe.unet.config.in_channels, latent_side, latent_side)
    call = {"height": resolution, "width": resolution, "num_inference_steps": num_inference_steps}
    call["guidance_scale"] = guidance_scale

    on_cpu = torch.device(device).type == "cpu"
    size = batch_size if batch_size != "auto" else (AUTO_CPU_BATCH if on_cpu else AUTO_MAX_BATCH)
    made, start = 0, 0
    with tqdm(total=len(todo), desc="Generating class images", unit="img", disable=rank != 0) as bar:
        while start < len(todo):
            chunk = todo[start : start + size]
            try:
                images = _render(pipe, chunk, seed, embeds, latent_shape, **call)
            except torch.cuda.OutOfMemoryError:
                if batch_size != "auto" or size == 1:
                    raise
                size = max(1, len(chunk) // 2)
                torch.cuda.empty_cache()
                log.info("Out of memory with %d images per batch; trying %d.", len(chunk), size)
                continue
            for i, image in zip(chunk, images, strict=True):
                save_image_atomic(image, class_dir / class_image_name(i))
                made += 1
            bar.update(len(chunk))
            start += len(chunk)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return made


def _wait_for_all_ranks(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def _render(pipe, chunk: list[int], seed: int, embeds: dict, latent_shape, **call) -> list:
    """The PIL images of ``chunk`` (image indices), each from the seed ``seed + i``, in one pipeline call."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    # Initial noise per image from its own CPU generator: identical on any device and for any batch size.
    latents = torch.cat(
        [torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed + i)) for i in chunk]
    ).to(device, dtype)  # (b, 4, h, w)
    repeated = {  # (b, 77, D) / (b, P) each
        name: None if e is None else e.repeat(len(chunk), *[1] * (e.ndim - 1)) for name, e in embeds.items()
    }
    return pipe(latents=latents, **repeated, **call).images
