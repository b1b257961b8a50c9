"""Single-file Stable Diffusion 1.x / 2.x checkpoints, as shared on model sites, Lightning-free.

- Reading: ``.safetensors``, or a pickle-based ``.ckpt`` / ``.pt`` / ``.pth`` only through
  ``torch.load(weights_only=True)``, which builds tensors and plain containers and refuses everything else, so a
  file that would run code on unpickling is refused before any of it runs. The family is told from the key names
  first (:func:`sd.models.families.family_of_keys`: SD 1.x or 2.x; SDXL, SD 3, Flux and inpainting models
  are refused by name), then diffusers' ``from_single_file`` converts the weights, with the diffusers configs
  (architecture, tokenizer, scheduler) taken from a local folder or a hub id (by default the family's
  ``single_file_config``; only its small config files are fetched, and from the local cache when offline).
- Writing: :func:`save_single_file` writes the UNet, VAE and text encoder of a pipeline in the original layout of its
  family (:mod:`sd.models.original_layout`), as AUTOMATIC1111 and ComfyUI load it.
"""

from __future__ import annotations

import functools
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.errors import InputFileError, InputNotFoundError
from sd.models.builtin import resolve_pretrained
from sd.models.families import Family, family_of_keys, family_of_pipeline
from sd.models.ldm_config import is_v_prediction
from sd.models.original_layout import UNET_PREFIX, VAE_PREFIX, to_original_layout

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` names a single-file checkpoint (by its suffix; it need not exist)."""
    return Path(str(path)).suffix.lower() in SINGLE_FILE_SUFFIXES


def read_checkpoint_keys(path: str | Path) -> list[str]:
    """The weight names of a single-file checkpoint, read without running code and without loading the weights.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown suffix, or a pickle that ``torch.load(weights_only=True)`` refuses (it would need to
            import and call code to load); the message names the file.
    """
    return list(checkpoint_shapes(path))


def read_checkpoint_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """The shape of one weight of a single-file checkpoint."""
    return checkpoint_shapes(path)[key]


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape (a ``.safetensors`` header read; a pickle memory-mapped), read once per version
    of the file: family detection, the completeness check and the loader all ask."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Single-file checkpoint {str(path)!r} does not exist.")
    stat = path.stat()
    return dict(_checkpoint_shapes(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _checkpoint_shapes(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, ...]]:
    suffix = Path(path).suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - no iteration
    if suffix in PICKLE_SUFFIXES:
        return {key: tuple(value.shape) for key, value in load_pickle_checkpoint(path).items()}
    raise InputFileError(f"{path!r}: unknown checkpoint format {suffix!r}; give a {' / '.join(SINGLE_FILE_SUFFIXES)}.")


def load_pickle_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.ckpt`` state dict through ``torch.load(weights_only=True)`` (memory-mapped when the file allows it).

    ``weights_only`` unpickles tensors and plain containers only; a file that names any other callable (which is how
    a pickle runs code) is refused before anything of it runs.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        needs = f" (it names {found.group(1)})" if found else ""
        raise InputFileError(
            f"Refusing to load {str(path)!r}: it is a pickle that needs more than tensors to load{needs}, and "
            "unpickling it could execute code. Use a .safetensors version of the model (model sites usually offer "
            "one), or convert it in a sandbox you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputFileError(f"{str(path)!r} is no readable PyTorch checkpoint: {e}") from e
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise InputFileError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a state dict of named weights.")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def check_checkpoint_keys(keys: Iterable[str], path: str | Path, shape_of=None) -> Family:
    """The family of a single-file checkpoint; refused, naming the file, if we do not train it or it is incomplete."""
    keys = list(keys)
    family = family_of_keys(keys, repr(str(path)), shape_of)
    parts = {UNET_PREFIX: "UNet", VAE_PREFIX: "VAE", family.text_encoder_prefix: "text encoder"}
    parts |= {prefix: "first text encoder" for prefix in family.other_text_encoder_prefixes}  # SDXL's CLIP ViT-L
    missing = [f"{name} ({prefix}*)" for prefix, name in parts.items() if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise InputFileError(
            f"{str(path)!r} is no complete {family.label} checkpoint in the original layout: it lacks the "
            f"{', '.join(missing)} weights (found e.g. {keys[:3]})."
        )
    return family


def check_single_file(path: str | Path) -> Family:
    """The family of a readable SD 1.x / 2.x single-file checkpoint, checked without loading its weights."""
    return check_checkpoint_keys(read_checkpoint_keys(path), path, lambda key: read_checkpoint_shape(path, key))


def load_single_file_pipeline(
    path: str | Path,
    config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    **components: nn.Module,
) -> StableDiffusionPipeline:
    """The family's pipeline from a single-file SD 1.x / 2.x / SDXL checkpoint, through diffusers' ``from_single_file``.

    Args:
        path: The ``.safetensors`` (or ``.ckpt``, loaded with ``weights_only``) file.
        config: A diffusers folder, hub id or ``builtin:<name>`` whose configs describe the checkpoint's architecture
            (and provide tokenizer and scheduler); defaults to the family's (SD 1.5's, SD 2.1's).
        torch_dtype: Dtype of the loaded weights.
        components: Modules to use instead of loading them from the file (e.g. a trained ``unet``).
    """
    path = Path(path)
    family = check_single_file(path)
    config = resolve_pretrained(config or family.single_file_config)
    options = {k: v for k, v in family.pipeline_options.items() if k != "feature_extractor"}
    try:
        pipe = family.pipeline_type().from_single_file(  # the family's pipeline: SDXL's reads conditioner.embedders
            str(path), config=config, torch_dtype=torch_dtype, **options, **components
        )
    except Exception as e:  # diffusers' messages name neither the file nor the config; add both
        raise InputFileError(
            f"Could not load {str(path)!r} as {family.label} with the diffusers configs of {config!r} "
            f"(model.single_file_config; a diffusers folder or hub id of the same architecture, whose config files "
            f"must be local when offline): {type(e).__name__}: {e}"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the pipeline's UNet, VAE and text encoder as one ``.safetensors`` in its family's original layout."""
    family = family_of_pipeline(pipe)
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)  # SDXL's second text encoder
    state = to_original_layout(
        pipe.unet.state_dict(),
        pipe.unet.config,
        pipe.vae.state_dict(),
        pipe.vae.config,
        pipe.text_encoder.state_dict(),
        family.text_encoder_layout,
        text_encoder_2.state_dict() if text_encoder_2 is not None else None,
    )
    state = {k: v.detach().contiguous() for k, v in state.items()}
    architecture = family.modelspec_architecture(is_v_prediction(pipe.scheduler.config))
    header = {"format": "pt", "modelspec.architecture": architecture, **(metadata or {})}
    save_file(state, str(path), metadata=header)
    return Path(path)
