"""Base-model families: which Stable Diffusion a model is, told from its files, Lightning-free.

What differs between the families this project trains is described here, once per family (:class:`Family`); the rest
of the code asks the family instead of testing names. The family is detected, never configured:

- a diffusers folder: ``model_index.json`` (the pipeline class), ``unet/config.json`` (input channels) and
  ``text_encoder/config.json`` (OpenAI CLIP, whose MLP uses ``quick_gelu``, for SD 1.x; OpenCLIP-H, ``gelu``, for
  SD 2.x);
- a hub id: the same three small files, fetched (or read from the local cache when offline) before anything loads;
  (:func:`lightning_modules.sd_loading.detect_family` picks the way for a path);
- a single-file checkpoint: its key names (``cond_stage_model.transformer.*`` for SD 1.x,
  ``cond_stage_model.model.*`` for SD 2.x) and the input width of the UNet's first convolution.

A model of a family this project does not train (SDXL, its refiner, SD 3, Flux, inpainting / depth / instruct-pix2pix
UNets, upscalers) is refused by name, before any weights load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.errors import InputFileError
from lightning_modules.ldm_config import SD1_COND_STAGE
from lightning_modules.sd_layout import OPENCLIP_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX

UNET_FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"  # (out, in, 3, 3) in the original layout


@dataclass(frozen=True)
class Family:
    """What differs between base-model families, in one place.

    Attributes:
        name: Short name (``sd1``, ``sd2``), as in messages and file metadata.
        label: The family as people call it.
        text_encoder_prefix: Where the text encoder's weights live in an original-layout single file.
        text_encoder_layout: ``clip`` (transformers' CLIP names under ``transformer.``) or ``openclip`` (OpenCLIP's
            ``resblocks`` with fused q/k/v projections), as the original checkpoints store them.
        single_file_config: The diffusers model whose configs describe a single file of this family by default
            (``model.single_file_config``).
        cond_stage_config: The text encoder in the original (latent-diffusion) model config, as AUTOMATIC1111 reads it.
    """

    name: str
    label: str
    text_encoder_prefix: str
    text_encoder_layout: str
    single_file_config: str
    cond_stage_config: Mapping[str, Any]

    def modelspec_architecture(self, v_prediction: bool) -> str:
        """The ``modelspec.architecture`` of a single file of this family (the Stability AI model spec's names)."""
        if self.name == "sd1":
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"


SD1 = Family(
    name="sd1",
    label="Stable Diffusion 1.x",
    text_encoder_prefix=TEXT_ENCODER_PREFIX,
    text_encoder_layout="clip",
    single_file_config="stable-diffusion-v1-5/stable-diffusion-v1-5",
    cond_stage_config=SD1_COND_STAGE,
)
SD2 = Family(
    name="sd2",
    label="Stable Diffusion 2.x",
    text_encoder_prefix=OPENCLIP_PREFIX,
    text_encoder_layout="openclip",
    single_file_config="stabilityai/stable-diffusion-2-1",
    cond_stage_config={
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"freeze": True, "layer": "penultimate"},
    },
)
FAMILIES = {f.name: f for f in (SD1, SD2)}
TRAINED = "Stable Diffusion 1.x and 2.x"

# Pipeline classes (model_index.json's _class_name) of families this project does not train.
_OTHER_PIPELINES = {
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL (refiner or img2img)",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
    "StableDiffusionInpaintPipeline": "Stable Diffusion inpainting",
    "StableDiffusionDepth2ImgPipeline": "Stable Diffusion depth-to-image",
    "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix",
    "StableDiffusionUpscalePipeline": "Stable Diffusion x4 upscaler",
    "StableDiffusionLatentUpscalePipeline": "Stable Diffusion latent upscaler",
    "StableUnCLIPPipeline": "Stable unCLIP",
    "StableUnCLIPImg2ImgPipeline": "Stable unCLIP",
}
# Key prefixes of original-layout single files of families this project does not train (checked before SD 1.x / 2.x).
_OTHER_KEY_PREFIXES = {
    "conditioner.embedders.1.": "SDXL",  # base: CLIP ViT-L (embedders.0) and OpenCLIP bigG (embedders.1)
    "conditioner.embedders.0.model.": "SDXL refiner",  # the refiner has only the OpenCLIP bigG encoder
    "conditioner.embedders.": "SDXL",
    "text_encoders.": "Stable Diffusion 3",
    "model.diffusion_model.joint_blocks.": "Stable Diffusion 3",
    "double_blocks.": "Flux",
    "model.diffusion_model.double_blocks.": "Flux",
}
# The UNet's input channels that mark a conditioned UNet rather than a text-to-image one.
_OTHER_UNET_INPUTS = {9: "inpainting", 8: "InstructPix2Pix", 5: "depth-to-image", 7: "x4 upscaler"}


class UnsupportedModelError(InputFileError):
    """A model of a family this project does not train."""


def _refuse(source: str, what: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source}: this is a model of another family, {what} ({why}); this project trains {TRAINED} "
        "text-to-image models. "
        "Give a base model of one of those families (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or "
        "stabilityai/stable-diffusion-2-1)."
    )


def family_of_configs(
    unet: Mapping[str, Any], text_encoder: Mapping[str, Any] | None, source: str, pipeline_class: str | None = None
) -> Family:
    """The family of a model from its diffusers configs (``model_index.json``'s class, the UNet's, the text encoder's).

    ``text_encoder`` may be None (not known): the UNet's cross-attention width then decides (768 SD 1.x, 1024 SD 2.x).
    """
    if pipeline_class in _OTHER_PIPELINES:
        raise _refuse(source, _OTHER_PIPELINES[pipeline_class], f"its pipeline is {pipeline_class}")
    in_channels = unet.get("in_channels", 4)
    if in_channels != 4:
        what = _OTHER_UNET_INPUTS.get(in_channels, "conditioned")
        raise _refuse(source, f"Stable Diffusion {what}", f"its UNet takes {in_channels} input channels, not 4")
    if unet.get("addition_embed_type") is not None:  # SDXL's added time / text conditioning
        raise _refuse(source, "SDXL", f"its UNet has addition_embed_type {unet['addition_embed_type']!r}")
    if text_encoder is not None:
        # OpenCLIP (SD 2.x) and OpenAI CLIP (SD 1.x) differ in the MLP's activation, whatever the model's size.
        return SD2 if text_encoder.get("hidden_act") == "gelu" else SD1
    return SD2 if unet.get("cross_attention_dim") == 1024 else SD1


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputFileError(f"{str(path)!r} is no readable JSON config: {e}") from e


def family_of_folder(folder: str | Path) -> Family:
    """The family of a diffusers model folder (one with ``model_index.json``), read from its small config files."""
    folder = Path(folder)
    return _family_of_files(lambda name: folder / name if (folder / name).is_file() else None, str(folder))


def _family_of_files(find: Callable[[str], Path | None], source: str) -> Family:
    index_path = find("model_index.json")
    if index_path is None:
        raise InputFileError(f"{source} has no model_index.json: it is no diffusers model.")
    index = _read_json(index_path)
    pipeline_class = index.get("_class_name")
    if pipeline_class in _OTHER_PIPELINES:
        raise _refuse(source, _OTHER_PIPELINES[pipeline_class], f"its pipeline is {pipeline_class}")
    if "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None:
        raise _refuse(source, "SDXL", "it has a second text encoder")
    unet_path = find("unet/config.json")
    if unet_path is None:
        raise InputFileError(f"{source} has no unet/config.json: it is no Stable Diffusion model.")
    te_path = find("text_encoder/config.json")
    return family_of_configs(_read_json(unet_path), _read_json(te_path) if te_path else None, source, pipeline_class)


@functools.lru_cache(maxsize=32)  # each load asks; the hub is asked once per process
def family_of_hub_id(repo_id: str, revision: str | None = None) -> Family | None:
    """The family of a hub model from its config files (the local cache when offline); None when they are not at hand.

    Only the small config files are fetched. When they cannot be had (no network, no cache), the family is left
    unknown here and the loader reports what it cannot find.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a diffusers dependency
        return None

    def find(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception:  # missing file, no network, no cache, gated repository: the loader will say
            return None

    if find("model_index.json") is None:
        return None
    return _family_of_files(find, repr(repo_id))


def family_of_keys(
    keys: Iterable[str], source: str, shape_of: Callable[[str], tuple[int, ...]] | None = None
) -> Family:
    """The family of an original-layout single-file checkpoint from its key names (and the UNet's first convolution).

    ``shape_of(key)`` gives a weight's shape without loading it; with it, inpainting and other conditioned UNets are
    told apart from text-to-image ones.
    """
    keys = list(keys)
    for prefix, what in _OTHER_KEY_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            raise _refuse(source, what, f"it has {prefix}* weights")
    if shape_of is not None and UNET_FIRST_CONV in keys:
        shape = tuple(shape_of(UNET_FIRST_CONV))
        if len(shape) == 4 and shape[1] != 4:
            what = _OTHER_UNET_INPUTS.get(shape[1], "conditioned")
            raise _refuse(source, f"Stable Diffusion {what}", f"its UNet takes {shape[1]} input channels, not 4")
    if any(k.startswith(SD2.text_encoder_prefix) for k in keys):
        return SD2
    return SD1


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline (or anything with ``unet`` and ``text_encoder`` modules)."""
    text_encoder = getattr(pipe, "text_encoder", None)
    te_config = dict(text_encoder.config.to_dict()) if text_encoder is not None else None
    return family_of_configs(dict(pipe.unet.config), te_config, type(pipe).__name__)
