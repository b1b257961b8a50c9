"""Exports that other tools load, written atomically, Lightning-free, and loading them back (an export folder, or a
LoRA file into the live modules or a pipeline).

- LoRA and DoRA: ``pytorch_lora_weights.safetensors`` in the layout the family pipeline's ``load_lora_weights`` reads
  (SDXL: ``unet``, ``text_encoder`` and ``text_encoder_2``), and ``pytorch_lora_weights_kohya.safetensors`` in the
  kohya layout AUTOMATIC1111 and ComfyUI read (SDXL: ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_``).
- LoHa and LoKr: ``pytorch_lora_weights_kohya.safetensors`` only, under LyCORIS' names (AUTOMATIC1111, ComfyUI);
  diffusers loads neither from a file.
- Full fine-tune: ``pipeline/``, a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` reads, and
  (optionally) ``model.safetensors``, one file in the original SD 1.x layout (``from_single_file``, AUTOMATIC1111,
  ComfyUI); for a v-prediction model also ``model.yaml``, its original config with ``parameterization: "v"``, which
  AUTOMATIC1111 reads beside the file (:mod:`sd.models.ldm_config`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import InputFileError, InputNotFoundError
from core.safe_files import atomic_directory
from sd.adapters.formats import check_lora_file, save_kohya_lora, with_text_model_prefix
from sd.adapters.lora import (
    adapter_kind,
    load_lora_weights,
    lora_metadata,
    lora_pipeline_class,
    lora_state_dict,
)
from sd.adapters.new_tokens import EMBEDDINGS_NAME
from sd.export.layout import (
    INFO_NAME,
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    PIPELINE_DIRNAME,
    SINGLE_FILE_NAME,
    lycoris_export_note,
    resolve_lora_file,
)
from sd.models.families import family_of_pipeline
from sd.models.ldm_config import is_v_prediction, write_ldm_config
from sd.models.loading import load_pipeline
from sd.models.single_file import save_single_file

log = logging.getLogger(__name__)


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def check_finite(models: dict[str, nn.Module | None]) -> None:
    """Refuse to export weights that hold NaN or infinity (a diverged run)."""
    for model_name, model in models.items():
        for name, param in model.named_parameters() if model is not None else []:
            if param.requires_grad and not torch.isfinite(param).all():
                raise FloatingPointError(f"Not exporting: {model_name}.{name} holds NaN or infinite values.")


def export_lora(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    out_dir: str | Path,
    base_model: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    embeddings: dict[str, torch.Tensor] | None = None,
    new_tokens: list[str] | None = None,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the UNet (and text-encoder, when it has one) adapters as a diffusers and a kohya LoRA file (LoRA, DoRA),
    or as a LyCORIS file (LoHa, LoKr: the kohya file's name, LyCORIS' key names), and return the diffusers file's path
    (the LyCORIS file's for LoHa / LoKr). The new tokens' embeddings (pivotal tuning, ``embeddings``:
    :func:`sd.adapters.new_tokens.embedding_file_state`) go beside them as ``embeddings.safetensors``, their
    tokens (``new_tokens``) recorded in ``export_info.json``.

    ``text_encoder`` (and SDXL's ``text_encoder_2``) may be None (a frozen text encoder that was never loaded: cached
    text embeddings).

    The base model's name (``revision``, ``variant``, ``single_file_config``) is recorded so :func:`load_export`
    can rebuild the pipeline.
    """
    check_finite({"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    te = text_encoder if text_encoder is not None and has_lora(text_encoder) else None  # the encoders with adapters
    te2 = text_encoder_2 if text_encoder_2 is not None and has_lora(text_encoder_2) else None
    kind = adapter_kind(unet.peft_config["default"])
    if kind in ("loha", "lokr"):
        with atomic_directory(out_dir) as tmp:
            save_kohya_lora(unet, te, tmp / KOHYA_WEIGHT_NAME, base_model, te2)
            files = [KOHYA_WEIGHT_NAME] + _save_embeddings(tmp, embeddings)
            _write_info(tmp, "lora", files, base_model, revision, variant, single_file_config, kind, new_tokens)
        return Path(out_dir) / KOHYA_WEIGHT_NAME
    adapters = {}  # the text encoders' adapters, by their name in the pipeline
    for name, model in (("text_encoder", te), ("text_encoder_2", te2)):
        if model is not None:
            adapters[f"{name}_lora_layers"] = text_encoder_lora_layers(model)
            adapters[f"{name}_lora_adapter_metadata"] = lora_metadata(model)
    with atomic_directory(out_dir) as tmp:
        lora_pipeline_class(unet).save_lora_weights(  # the family's: SDXL's writes text_encoder_2 too
            tmp,
            unet_lora_layers=lora_state_dict(unet),
            unet_lora_adapter_metadata=lora_metadata(unet),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
            **adapters,
        )
        save_kohya_lora(unet, te, tmp / KOHYA_WEIGHT_NAME, base_model, te2)
        files = [LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME] + _save_embeddings(tmp, embeddings)
        adapter = kind if kind != "lora" else None  # a plain LoRA's info file as before
        _write_info(tmp, "lora", files, base_model, revision, variant, single_file_config, adapter, new_tokens)
    return Path(out_dir) / LORA_WEIGHT_NAME


def _save_embeddings(folder: Path, embeddings: dict[str, torch.Tensor] | None) -> list[str]:
    """Write the new tokens' embedding file into ``folder`` (pivotal tuning); the names of the files written."""
    if embeddings is None:
        return []
    save_file(embeddings, str(folder / EMBEDDINGS_NAME))
    return [EMBEDDINGS_NAME]


def text_encoder_lora_layers(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The text encoder's adapter weights as the diffusers file holds them: with the ``text_model.`` level (so that
    transformers < 5.6, not flattened, finds the layers too), DoRA's magnitudes as ``lora_magnitude_vector.weight``.

    Without that suffix transformers' adapter loader (which diffusers' ``load_lora_weights`` uses for the text encoder)
    leaves the magnitudes at their initial value (its load report lists them as missing); peft's loader reads both.
    """
    state = with_text_model_prefix(lora_state_dict(text_encoder))
    return {(k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in state.items()}


def export_full(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    out_dir: str | Path,
    base_model: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file: bool = True,
    single_file_config: str | None = None,
    text_encoder_2: nn.Module | None = None,
    vae: str | None = None,
) -> Path:
    """Write a diffusers pipeline folder of the base model's family: the trained UNet (and text encoders), the base
    model's other parts (the VAE: ``vae`` when given, as ``model.vae``).

    With ``single_file`` the same weights are also written as one ``model.safetensors`` in the family's original
    layout (SDXL: ``conditioner.embedders.0/1``).
    """
    trained = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    trained |= {"text_encoder_2": text_encoder_2} if text_encoder_2 is not None else {}
    check_finite(trained)
    pipe = load_pipeline(base_model, revision, variant, single_file_config=single_file_config, vae=vae, **trained)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp / PIPELINE_DIRNAME, safe_serialization=True)
        files = [PIPELINE_DIRNAME]
        if single_file:
            files += _save_single_file(pipe, tmp, base_model)
        _write_info(tmp, "full", files, base_model, revision, variant, single_file_config)
    return Path(out_dir) / PIPELINE_DIRNAME


def _save_single_file(pipe: StableDiffusionPipeline, folder: Path, base_model: str) -> list[str]:
    """``model.safetensors`` and, for a v-prediction model, the ``model.yaml`` that tells AUTOMATIC1111 so."""
    v_prediction = is_v_prediction(pipe.scheduler.config)
    metadata = {"base_model": str(base_model), "modelspec.prediction_type": "v" if v_prediction else "epsilon"}
    save_single_file(pipe, folder / SINGLE_FILE_NAME, metadata=metadata)
    if not v_prediction:
        return [SINGLE_FILE_NAME]
    config_name = Path(SINGLE_FILE_NAME).with_suffix(".yaml").name
    write_ldm_config(pipe, folder / config_name, dict(family_of_pipeline(pipe).cond_stage_config))
    log.warning(
        "The base model predicts v (v-prediction), which a single-file checkpoint cannot say by itself: %s is "
        "written beside %s for AUTOMATIC1111 (keep them together, with the same name). ComfyUI renders SD 1.x files "
        "as epsilon: add a ModelSamplingDiscrete node with sampling v_prediction (see the README, Interchange).",
        config_name,
        SINGLE_FILE_NAME,
    )
    return [SINGLE_FILE_NAME, config_name]


def load_export(export_dir: str | Path, torch_dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A pipeline with the exported weights: the pipeline folder, or the base model with the LoRA file loaded."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise InputNotFoundError(f"Export folder {str(folder)!r} does not exist (fit writes <run dir>/export).")
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        raise InputNotFoundError(f"{str(folder)!r} is no export folder: it has no {INFO_NAME}.")
    info = json.loads(info_path.read_text())
    if info["kind"] == "full":
        return load_pipeline(str(folder / PIPELINE_DIRNAME), torch_dtype=torch_dtype)
    if info.get("adapter") in ("loha", "lokr"):
        raise InputFileError(f"{str(folder)!r} {lycoris_export_note(info['adapter'])}")
    base = info["base_model"]
    pipe = load_pipeline(
        base, info.get("revision"), info.get("variant"), torch_dtype, single_file_config=info.get("single_file_config")
    )
    pipe = load_lora_into_pipeline(pipe, folder / LORA_WEIGHT_NAME)
    if info.get("new_tokens"):  # pivotal tuning: the new tokens, through diffusers' textual-inversion loader
        state = load_file(str(folder / EMBEDDINGS_NAME))  # (k, D) per text encoder, under the family's key
        family = family_of_pipeline(pipe)
        for key, encoder, tokenizer in zip(family.embedding_keys, family.text_encoders, family.tokenizers, strict=True):
            pipe.load_textual_inversion(
                state[key],
                token=info["new_tokens"],
                text_encoder=getattr(pipe, encoder),
                tokenizer=getattr(pipe, tokenizer),
            )
    return pipe


def _write_info(
    folder: Path,
    kind: str,
    files: list[str],
    base_model: str,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
    adapter: str | None = None,
    new_tokens: list[str] | None = None,
) -> None:
    info = {"kind": kind, "base_model": base_model, "revision": revision, "variant": variant}
    info |= {"single_file_config": single_file_config, "files": files}
    if adapter is not None:
        info["adapter"] = adapter
    if new_tokens:
        info["new_tokens"] = new_tokens
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


def load_lora_file(
    unet: nn.Module,
    text_encoder: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    text_encoder_2: nn.Module | None = None,
) -> None:
    """Load a diffusers LoRA file (as :func:`lora_state_dict` exports it) into the UNet and, when the file has
    text-encoder weights, the text encoder(s), as peft adapters named ``adapter_name``, in place and frozen.

    The adapters take their rank, alpha and targets from the file's header; under the name ``default`` their weights
    have the keys of adapters that :func:`inject_lora` makes, so a Lightning checkpoint of the same run loads on top.
    """
    load_lora_weights(unet, text_encoder, resolve_lora_file(path), adapter_name, text_encoder_2)
    for model in (unet, text_encoder, text_encoder_2):
        for name, param in model.named_parameters() if model is not None else []:
            if "lora_" in name:
                param.requires_grad_(False)
                param.data = param.data.float()


def load_lora_into_pipeline(
    pipe: StableDiffusionPipeline, path: str | Path, adapter_name: str | None = None
) -> StableDiffusionPipeline:
    """Check a diffusers or kohya LoRA file (or a LoRA export folder) against ``pipe``, then load it as diffusers'
    ``load_lora_weights`` reads it (through peft's API for the text encoder: see :func:`lora.load_lora_weights`)."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    path = resolve_lora_file(path, "LoRA file or export folder")
    check_lora_file(path, pipe.unet, pipe.text_encoder, text_encoder_2)
    load_lora_weights(pipe.unet, pipe.text_encoder, path, adapter_name, text_encoder_2)
    return pipe
