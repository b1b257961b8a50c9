"""Latent and text-embedding caches, Lightning-free: what the frozen encoders compute, computed once.

- Latents: when the VAE is frozen and an image's pixels never change between epochs (center crop; a random flip
  is cached both ways), the VAE's latent distribution of every image, (mean, std) x ``scaling_factor``, is computed
  once, batched. Training samples ``mean + std * randn`` each step, which is what ``latent_dist.sample()`` does:
  the training signal is the same as encoding every step.
- Text embeddings: with a frozen text encoder, each distinct prompt (instance and class prompts, each caption) is
  encoded once (SDXL: by both encoders, with the second's pooled embedding beside) and cached as its own entry, so a
  changed caption re-encodes that caption only.

Each cache is a safetensors file named by a key, the SHA-256 of everything its content depends on: for latents the
images' bytes (in order), the resolution, crop and flip, the VAE (base model, revision, variant, config and weight
files) and, with loss masks, each mask file's bytes; for a text entry its prompt, the family's text layout, its
tokenizers and text encoders. Any change gives another key, so a cache is rebuilt, never silently stale. The key is
also stored inside the file and checked on load. Files are written atomically (temporary file, then rename), with a
JSON sidecar saying what went into them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from core.safe_files import atomic_path, file_sha256
from datamodules.images import load_image

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what a cache file holds changes
TEXT_FORMAT_VERSION = 2  # 2: one entry per prompt (1 held the whole prompt set in one file)
ENCODE_BATCH_SIZE = 4  # images per VAE call while building the latent cache


class LatentTable(NamedTuple):
    """Cached latent distributions of N images in V orientations (V = 2 with random flip: index 1 is flipped)."""

    mean: Tensor  # (N, V, 4, h, w) float32, x scaling_factor
    std: Tensor  # (N, V, 4, h, w) float32, x scaling_factor
    mask: Tensor | None = None  # (N, V, 1, h, w) float32 loss masks at latent size (ones: no mask), or None


class LatentMasks(NamedTuple):
    """The loss masks to cache beside the latents of N images.

    Attributes:
        keys: Per image, what its mask is made from (:func:`datamodules.masks.mask_key`: the mask file's SHA-256,
            ``alpha``, or None for no mask); part of the cache key, so a changed mask file rebuilds the entry.
        pixels: ``pixels(i)`` -> (1, H, W) mask of image ``i`` in [0, 1], cropped as its latents were encoded,
            unflipped; called only for images whose key is not None.
    """

    keys: list[str | None]
    pixels: Callable[[int], Tensor]


def latent_size_masks(masks: LatentMasks, views: int, size: tuple[int, int]) -> Tensor:
    """(N, views, 1, h, w): each image's mask (and its mirror image) averaged down to the latent grid ``size`` as
    :func:`sd.training.diffusion.dreambooth_loss` averages pixel masks (ones for an image without a mask)."""
    import torch.nn.functional as F

    rows = []
    for i, key in enumerate(masks.keys):
        if key is None:
            rows.append(torch.ones(views, 1, *size))
            continue
        center = masks.pixels(i)  # (1, H, W)
        pixels = torch.stack([center, center.flip(-1)][:views]).float()  # (views, 1, H, W): the flip before pooling
        rows.append(F.adaptive_avg_pool2d(pixels, size))
    return torch.stack(rows)


def default_cache_dir() -> Path:
    """``$DREAMBOOTH_CACHE/data`` (default ``~/.cache/dreambooth_lightning/data``), beside the built-in models."""
    from sd.models.builtin import cache_dir

    return cache_dir() / "data"


def part_fingerprint(
    pretrained_model_name_or_path: str,
    part: str,
    revision: str | None,
    variant: str | None,
    single_file_config: str | None = None,
) -> dict:
    """What identifies one part of a base model: its name, revision, variant, and its files' config and weights.

    A local folder (or a built-in model) contributes its config and each file's size and modification time; a hub
    model its config and the commit its files came from; a single-file checkpoint its size and modification time
    and the configs it is read with.
    """
    from sd.models.loading import check_model_path

    path = check_model_path(pretrained_model_name_or_path)
    fp: dict[str, Any] = {"model": pretrained_model_name_or_path, "revision": revision, "variant": variant}
    if Path(path).is_file():
        stat = Path(path).stat()
        fp["file"] = [stat.st_size, stat.st_mtime_ns]
        fp["single_file_config"] = single_file_config
        return fp
    folder = Path(path) / part
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        fp["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
        config = folder / "config.json"
        fp["config"] = json.loads(config.read_text()) if config.is_file() else None
        return fp
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    index = Path(hf_hub_download(path, "model_index.json", revision=revision))
    fp["commit"] = index.parent.name  # .../snapshots/<commit>/model_index.json: the files' exact version
    for name in ("config.json", "tokenizer_config.json"):
        try:
            fp["config"] = json.loads(Path(hf_hub_download(path, f"{part}/{name}", revision=revision)).read_text())
            break
        except EntryNotFoundError:
            continue
    return fp


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_cache(cache_dir: Path, kind: str, key: str, tensors: dict[str, Tensor], description: dict) -> Path:
    """Write ``<kind>-<key>.safetensors`` (the key in its header) and its JSON sidecar, each atomically."""
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{kind}-{key[:32]}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key, "format": str(FORMAT_VERSION)}))
    sidecar = json.dumps({"key": key, **description}, indent=2, default=str)
    _write_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(sidecar + "\n"))
    return path


def load_cache(cache_dir: Path, kind: str, key: str) -> dict[str, Tensor] | None:
    """The cached tensors under ``key``, or None when there are none (a damaged file is reported and ignored)."""
    from safetensors import safe_open

    path = cache_dir / f"{kind}-{key[:32]}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("Ignoring the unreadable cache file %s (%s); it will be rebuilt.", path, e)
        return None


def _pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _release_memory() -> None:
    """Give the memory of the encoders just dropped back (the caller deletes its references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_latent_table(
    vae,
    images: Sequence[str | Path],
    resolution: int,
    random_flip: bool,
    batch_size: int = ENCODE_BATCH_SIZE,
    bucket: tuple[int, int] | None = None,
) -> LatentTable:
    """Encode each image (center crop, as training sees it: the square, or ``bucket``'s (height, width) with
    aspect-ratio buckets) and, with ``random_flip``, its mirror image."""
    from datamodules.datasets import image_transform

    transform = image_transform(resolution, center_crop=True, random_flip=False)
    if bucket is not None:
        from functools import partial

        from datamodules.buckets import bucket_pixels

        transform = partial(bucket_pixels, bucket=bucket)
    sf = vae.config.scaling_factor
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(load_image(p)) for p in images[start : start + batch_size]])  # (b, 3, H, W)
        views = [pixels, pixels.flip(-1)] if random_flip else [pixels]
        dists = [vae.encode(v.to(vae.device, vae.dtype)).latent_dist for v in views]
        means.append(torch.stack([d.mean.float().cpu() * sf for d in dists], dim=1))  # (b, V, 4, h, w)
        stds.append(torch.stack([d.std.float().cpu() * sf for d in dists], dim=1))
    return LatentTable(torch.cat(means), torch.cat(stds))


def latent_cache(
    images: Sequence[str | Path],
    resolution: int,
    random_flip: bool,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
    bucket: tuple[int, int] | None = None,
    vae: str | None = None,
    masks: LatentMasks | None = None,
) -> LatentTable:
    """The latent distributions of ``images`` (in order), from the cache or encoded now and cached; with ``bucket``
    (height, width), each image resized to cover it and center-cropped to it (aspect-ratio buckets).

    Only a miss loads the VAE (float32, on ``device``: CUDA when available); it is freed before returning. ``vae``:
    another VAE than the model's (``model.vae``). With ``masks``, each image's loss mask at latent size is cached in
    the same entry (``LatentTable.mask``), so a cached run reads no mask file; the masks' files are in the key.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if vae:
        vae_fingerprint = part_fingerprint(vae, "vae", None, None) if _is_model_folder(vae) else _vae_fingerprint(vae)
    else:
        vae_fingerprint = part_fingerprint(pretrained_model_name_or_path, "vae", revision, variant, single_file_config)
    description = {
        "kind": "latents",
        "format": FORMAT_VERSION,
        "images": [file_sha256(p) for p in images],
        "resolution": resolution,
        "center_crop": True,
        "random_flip": random_flip,
        "vae": vae_fingerprint,
    }
    if bucket is not None:  # only then: the square cache's key stays what it was
        description["bucket"] = list(bucket)
    if masks is not None:  # likewise: without masks the key stays what it was
        description["masks"] = list(masks.keys)
    key = cache_key(description)
    size = f"{bucket[1]}x{bucket[0]}" if bucket is not None else f"{resolution}x{resolution}"  # width x height
    cached = load_cache(cache_dir, "latents", key)
    if cached is not None and (masks is None or "mask" in cached):
        log.info("Latent cache hit: %d images at %s from %s.", len(images), size, cache_dir)
        return LatentTable(cached["mean"], cached["std"], cached.get("mask"))
    from sd.models.loading import load_parts

    log.info(
        "Building the latent cache: encoding %d images at %s%s once.", len(images), size, " (and flipped)" * random_flip
    )
    model = load_parts(pretrained_model_name_or_path, ["vae"], revision, variant, single_file_config, vae)["vae"]
    model = model.to(_pick_device(device)).eval()
    table = encode_latent_table(model, images, resolution, random_flip, bucket=bucket)
    del model
    _release_memory()
    if masks is not None:
        table = table._replace(mask=latent_size_masks(masks, table.mean.shape[1], tuple(table.mean.shape[-2:])))
    description["image_paths"] = [str(p) for p in images]  # for people reading the sidecar; not part of the key
    save_cache(cache_dir, "latents", key, table._asdict(), description)
    return table


def _is_model_folder(vae: str) -> bool:
    from sd.models.builtin import resolve_pretrained

    return (Path(resolve_pretrained(vae)) / "vae").is_dir()


def _vae_fingerprint(vae: str) -> dict:
    """What identifies a separate VAE (``model.vae``): a VAE folder's config and files, or a hub id's config."""
    from sd.models.builtin import resolve_pretrained

    folder = Path(resolve_pretrained(vae)).expanduser()
    fp: dict[str, Any] = {"vae": vae}
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        fp["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
        return fp
    from huggingface_hub import hf_hub_download

    config = Path(hf_hub_download(vae, "config.json"))
    fp["commit"], fp["config"] = config.parent.name, json.loads(config.read_text())
    return fp


@torch.no_grad()
def text_embedding_cache(
    prompts: Sequence[str],
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
) -> dict[str, Tensor]:
    """Prompt -> (77, D) context of the frozen text encoder(s), from the cache or encoded now and cached."""
    args = (pretrained_model_name_or_path, revision, variant, cache_dir, device, single_file_config)
    return text_embedding_tables(prompts, *args)[0]


@torch.no_grad()
def text_embedding_tables(
    prompts: Sequence[str],
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(prompt -> (77, D) context, prompt -> (P,) pooled embedding or None) of the frozen text encoder(s), as
    :func:`sd.training.diffusion.encode_prompts` makes them for the model's family; from the cache or encoded
    now and cached.

    One cache entry per distinct prompt (``<cache_dir>/text/prompt-<key>.safetensors``), keyed by the prompt, the
    family's text layout and its tokenizers' and text encoders' fingerprints: changing one caption encodes that one
    caption only. Each prompt is encoded alone (a batch of one), so an entry's bits never depend on which other
    prompts happened to be missing with it.
    """
    from sd.models.families import SD1
    from sd.models.loading import check_model_path, detect_family

    family = detect_family(check_model_path(pretrained_model_name_or_path, revision), revision) or SD1
    prompts = sorted(set(prompts))
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "text"
    encoder = {"family": family.name, "text_context": family.text_context}  # what every entry's key shares
    for part in (*family.tokenizers, *family.text_encoders):
        encoder[part] = part_fingerprint(pretrained_model_name_or_path, part, revision, variant, single_file_config)
    keys = {
        p: cache_key({"kind": "text_embedding", "format": TEXT_FORMAT_VERSION, "prompt": p, **encoder}) for p in prompts
    }
    entries = {p: load_cache(folder, "prompt", keys[p]) for p in prompts}
    missing = [p for p in prompts if entries[p] is None]
    if missing:
        model = (pretrained_model_name_or_path, revision, variant, single_file_config)
        entries.update(_encode_and_cache(family, model, missing, keys, encoder, folder, device))
    else:
        log.info("Text-embedding cache hit: %d prompts from %s.", len(prompts), folder)
    embeds = {p: entries[p]["embeds"] for p in prompts}
    pooled = {p: entries[p]["pooled"] for p in prompts} if all("pooled" in e for e in entries.values()) else None
    return embeds, pooled


def _encode_and_cache(family, model: tuple, prompts: list[str], keys: dict, encoder: dict, folder: Path, device):
    """Encode each of ``prompts`` alone with the family's frozen text encoder(s) and cache each as its own entry."""
    from sd.models.loading import load_parts
    from sd.training.diffusion import encode_prompts

    log.info("Building the text-embedding cache: encoding %d new prompt(s) once.", len(prompts))
    loaded = load_parts(model[0], [*family.tokenizers, *family.text_encoders], *model[1:])
    encoders = [loaded[name].to(_pick_device(device)).eval() for name in family.text_encoders]
    tokenizers = [loaded[n] for n in family.tokenizers]
    entries = {}
    for prompt in prompts:
        text = encode_prompts(family, tokenizers, encoders, [prompt])
        entry = {"embeds": text.context[0].float().cpu()}  # (77, D)
        if text.pooled is not None:
            entry["pooled"] = text.pooled[0].float().cpu()  # (P_dim,)
        description = {"kind": "text_embedding", "format": TEXT_FORMAT_VERSION, "prompt": prompt, **encoder}
        save_cache(folder, "prompt", keys[prompt], entry, description)
        entries[prompt] = entry
    del encoders, loaded, tokenizers
    _release_memory()
    return entries
