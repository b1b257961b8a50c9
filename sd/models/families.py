"""Base-model families: which Stable Diffusion a model is, told from its files, Lightning-free.

What differs between the families this project trains is described here, once per family (:class:`Family`); the rest
of the code asks the family instead of testing names. The family is detected, never configured:

- a diffusers folder: ``model_index.json`` (the pipeline class), ``unet/config.json`` (input channels) and
  ``text_encoder/config.json`` (OpenAI CLIP, whose MLP uses ``quick_gelu``, for SD 1.x; OpenCLIP-H, ``gelu``, for
  SD 2.x);
- a hub id: the same three small files, fetched (or read from the local cache when offline) before anything loads;
  (:func:`sd.models.loading.detect_family` picks the way for a path);
- a single-file checkpoint: its key names (``cond_stage_model.transformer.*`` for SD 1.x,
  ``cond_stage_model.model.*`` for SD 2.x, ``conditioner.embedders.0/1.*`` for SDXL base) and the input width of the
  UNet's first convolution.

SDXL base is told by its pipeline class (``StableDiffusionXLPipeline``), its second text encoder and its UNet's added
conditioning (``addition_embed_type`` ``text_time``). A model of a family this project does not train (the SDXL
refiner, SD 3, Flux, inpainting / depth / instruct-pix2pix UNets, upscalers) is refused by name, before any weights
load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputFileError
from sd.models.ldm_config import SD1_COND_STAGE
from sd.models.original_layout import (
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
)

UNET_FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"  # (out, in, 3, 3) in the original layout


@dataclass(frozen=True)
class Family:
    """What differs between base-model families, in one place.

    Attributes:
        name: Short name (``sd1``, ``sd2``, ``sdxl``), as in messages and file metadata.
        label: The family as people call it.
        text_encoder_prefix: Where the (last) text encoder's weights live in an original-layout single file.
        text_encoder_layout: ``clip`` (transformers' CLIP names under ``transformer.``), ``openclip`` (OpenCLIP's
            ``resblocks`` with fused q/k/v projections) or ``sdxl`` (both: ``conditioner.embedders.0`` / ``.1``), as the
            original checkpoints store them.
        single_file_config: The diffusers model whose configs describe a single file of this family by default
            (``model.single_file_config``).
        cond_stage_config: The text encoder in the original (latent-diffusion) model config, as AUTOMATIC1111 reads it.
        pipeline_class: The diffusers text-to-image pipeline of the family (renders, class images, LoRA files).
        pipeline_options: What that pipeline is built with here (no safety checker, no invisible watermark).
        controlnet_pipeline_class: The family's text-to-image pipeline with a ControlNet (``predict`` with
            ``model.controlnet``), built with the same options.
        text_encoders: The pipeline's text encoders, in order (their tokenizers are the ``tokenizers``).
        tokenizers: The tokenizer of each text encoder.
        text_context: How the UNet's cross-attention context is made from the encoders: ``last`` (the one encoder's
            final hidden states, after its final layer norm) or ``penultimate`` (each encoder's penultimate hidden
            states, concatenated on the feature axis: SDXL).
        added_conditioning: The UNet's added conditioning: None, or ``text_time`` (SDXL: the last encoder's pooled,
            projected embedding and six size / crop numbers per row, ``time_ids``).
        vae_in_float32: The family's VAE overflows in float16 (SDXL's): it is held and run in float32 unless another
            VAE is given (``model.vae``).
        kohya_te_prefixes: The kohya LoRA module prefix of each text encoder (``lora_te_``; SDXL ``lora_te1_`` /
            ``lora_te2_``).
        kohya_unet_layout: The UNet module names of kohya LoRA files: ``diffusers`` (``down_blocks_0_attentions_0``,
            as sd-scripts names SD 1.x / 2.x) or ``original`` (``input_blocks_4_1``, as sd-scripts names SDXL).
        kohya_base_model_version: kohya's ``ss_base_model_version`` header entry.
        other_text_encoder_prefixes: Where the other text encoders' weights live in a single file (SDXL's CLIP ViT-L).
        embedding_keys: The key of each text encoder's vectors in a textual-inversion embedding file, as AUTOMATIC1111
            and ComfyUI read it (``emb_params``; SDXL ``clip_l`` / ``clip_g``, ComfyUI's ``comfy/sdxl_clip.py``).
    """

    name: str
    label: str
    text_encoder_prefix: str
    text_encoder_layout: str
    single_file_config: str
    cond_stage_config: Mapping[str, Any]
    pipeline_class: str = "StableDiffusionPipeline"
    pipeline_options: Mapping[str, Any] = field(
        default_factory=lambda: {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    controlnet_pipeline_class: str = "StableDiffusionControlNetPipeline"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    text_context: str = "last"
    added_conditioning: str | None = None
    vae_in_float32: bool = False
    kohya_te_prefixes: tuple[str, ...] = ("lora_te_",)
    kohya_unet_layout: str = "diffusers"
    kohya_base_model_version: str = "sd_v1"
    other_text_encoder_prefixes: tuple[str, ...] = ()
    embedding_keys: tuple[str, ...] = ("emb_params",)

    def modelspec_architecture(self, v_prediction: bool) -> str:
        """The ``modelspec.architecture`` of a single file of this family (the Stability AI model spec's names)."""
        if self.name == "sd1":
            return "stable-diffusion-v1"
        if self.name == "sdxl":
            return "stable-diffusion-xl-v1-base"
        return "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"

    def pipeline_type(self, controlnet: bool = False) -> type:
        """The diffusers pipeline class, with a ControlNet or without (imported on demand: this module stays free of
        heavy imports)."""
        import diffusers

        return getattr(diffusers, self.controlnet_pipeline_class if controlnet else self.pipeline_class)


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
SDXL = Family(
    name="sdxl",
    label="SDXL",
    text_encoder_prefix=SDXL_OPENCLIP_PREFIX,
    other_text_encoder_prefixes=(SDXL_CLIP_PREFIX,),
    text_encoder_layout="sdxl",
    single_file_config="stabilityai/stable-diffusion-xl-base-1.0",
    cond_stage_config={"target": "sgm.modules.GeneralConditioner"},  # (no .yaml is written: SDXL is epsilon)
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_options={"add_watermarker": False},  # the invisible watermark needs a package we do not ship
    controlnet_pipeline_class="StableDiffusionXLControlNetPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),  # CLIP ViT-L, OpenCLIP bigG (with projection)
    tokenizers=("tokenizer", "tokenizer_2"),
    text_context="penultimate",
    added_conditioning="text_time",
    vae_in_float32=True,
    kohya_te_prefixes=("lora_te1_", "lora_te2_"),
    embedding_keys=("clip_l", "clip_g"),
    kohya_unet_layout="original",
    kohya_base_model_version="sdxl_base_v1-0",
)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}
TRAINED = "Stable Diffusion 1.x, 2.x and SDXL (base)"

# Pipeline classes (model_index.json's _class_name) of families this project does not train.
_OTHER_PIPELINES = {
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
    "conditioner.embedders.0.model.": "SDXL refiner",  # the refiner has only the OpenCLIP bigG encoder
    "text_encoders.": "Stable Diffusion 3",
    "model.diffusion_model.joint_blocks.": "Stable Diffusion 3",
    "double_blocks.": "Flux",
    "model.diffusion_model.double_blocks.": "Flux",
}
# SDXL base single files: CLIP ViT-L (embedders.0) and OpenCLIP bigG (embedders.1).
SDXL_KEY_PREFIX = "conditioner.embedders.1."
# The UNet's input channels that mark a conditioned UNet rather than a text-to-image one.
_OTHER_UNET_INPUTS = {9: "inpainting", 8: "InstructPix2Pix", 5: "depth-to-image", 7: "x4 upscaler"}


class UnsupportedModelError(InputFileError):
    """A model of a family this project does not train."""


def _refuse(source: str, what: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source}: this is a model of another family, {what} ({why}); this project trains {TRAINED} "
        "text-to-image models. "
        "Give a base model of one of those families (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "stabilityai/stable-diffusion-2-1 or stabilityai/stable-diffusion-xl-base-1.0)."
    )


def family_of_configs(
    unet: Mapping[str, Any],
    text_encoder: Mapping[str, Any] | None,
    source: str,
    pipeline_class: str | None = None,
    has_text_encoder_2: bool | None = None,
) -> Family:
    """The family of a model from its diffusers configs (``model_index.json``'s class, the UNet's, the text encoder's).

    ``text_encoder`` may be None (not known): the UNet's cross-attention width then decides (768 SD 1.x, 1024 SD 2.x).
    ``has_text_encoder_2``: whether the model has SDXL's second text encoder (None: not known).
    """
    if pipeline_class in _OTHER_PIPELINES:
        raise _refuse(source, _OTHER_PIPELINES[pipeline_class], f"its pipeline is {pipeline_class}")
    in_channels = unet.get("in_channels", 4)
    sdxl_like = unet.get("addition_embed_type") == "text_time"
    if in_channels != 4:
        what = _OTHER_UNET_INPUTS.get(in_channels, "conditioned")
        base = "SDXL" if sdxl_like else "Stable Diffusion"
        raise _refuse(source, f"{base} {what}", f"its UNet takes {in_channels} input channels, not 4")
    if sdxl_like:  # SDXL's added time / text conditioning; the refiner conditions on OpenCLIP bigG alone (1280 wide)
        if has_text_encoder_2 is False or unet.get("cross_attention_dim") == 1280:
            raise _refuse(source, "SDXL refiner", "its UNet conditions on one text encoder with added time ids")
        return SDXL
    if unet.get("addition_embed_type") is not None:
        raise _refuse(
            source, "another conditioned UNet", f"its UNet has addition_embed_type {unet['addition_embed_type']!r}"
        )
    if has_text_encoder_2:
        raise _refuse(source, "SDXL-like", "it has a second text encoder but its UNet has no added conditioning")
    if pipeline_class == SDXL.pipeline_class:
        raise _refuse(source, "SDXL-like", f"its pipeline is {pipeline_class} but its UNet has no added conditioning")
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
    has_te2 = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    te_path = find("text_encoder/config.json")
    if has_te2 and te_path is None:
        raise _refuse(source, "SDXL refiner", "it has only the second (OpenCLIP bigG) text encoder")
    unet_path = find("unet/config.json")
    if unet_path is None:
        raise InputFileError(f"{source} has no unet/config.json: it is no Stable Diffusion model.")
    te_config = _read_json(te_path) if te_path else None
    return family_of_configs(_read_json(unet_path), te_config, source, pipeline_class, has_te2)


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
    sdxl = any(k.startswith(SDXL_KEY_PREFIX) for k in keys)
    if shape_of is not None and UNET_FIRST_CONV in keys:
        shape = tuple(shape_of(UNET_FIRST_CONV))
        if len(shape) == 4 and shape[1] != 4:
            what = _OTHER_UNET_INPUTS.get(shape[1], "conditioned")
            base = "SDXL" if sdxl else "Stable Diffusion"
            raise _refuse(source, f"{base} {what}", f"its UNet takes {shape[1]} input channels, not 4")
    if sdxl:
        return SDXL
    if any(k.startswith("conditioner.") for k in keys):  # SDXL's conditioner without its OpenCLIP bigG encoder
        raise _refuse(source, "SDXL-like", "it has conditioner.* weights but not SDXL base's two text encoders")
    if any(k.startswith(SD2.text_encoder_prefix) for k in keys):
        return SD2
    return SD1


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline (or anything with ``unet`` and ``text_encoder`` modules)."""
    text_encoder = getattr(pipe, "text_encoder", None)
    te_config = dict(text_encoder.config.to_dict()) if text_encoder is not None else None
    has_te2 = getattr(pipe, "text_encoder_2", None) is not None
    return family_of_configs(dict(pipe.unet.config), te_config, type(pipe).__name__, has_text_encoder_2=has_te2)
