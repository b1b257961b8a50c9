"""LoRA files other tools load, and the check of a LoRA file against a model before it loads, Lightning-free.

- The kohya format (``lora_unet_*`` / ``lora_te_*`` modules with ``lora_down``, ``lora_up`` and ``alpha``) that
  AUTOMATIC1111 and ComfyUI load: diffusers' ``convert_state_dict_to_kohya`` renames the peft weights; here the
  family's text-encoder prefixes (SD 1.x / 2.x ``lora_te_``; SDXL ``lora_te1_`` / ``lora_te2_``, as diffusers
  writes them), the family's UNet names (SDXL: the original layout, ``lora_unet_input_blocks_4_1_...``, as kohya
  sd-scripts' ``sdxl_train_network.py`` names its original-layout UNet; SD 1.x / 2.x: diffusers' names, as
  sd-scripts names them) and the trained alphas (diffusers writes alpha = rank) are set. DoRA adds each module's
  ``dora_scale``.
- LyCORIS' names for LoHa (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``) and LoKr
  (``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` / ``lokr_w2_b``, ``alpha``) under the same
  module names, which AUTOMATIC1111 and ComfyUI load (diffusers does not).
- :func:`check_lora_file`: a diffusers or kohya LoRA file is checked against a UNet and text encoder (model family,
  layer names, layer shapes) before it is loaded (:func:`sd.export.folder.load_lora_into_pipeline`), so a LoRA
  made for another architecture fails with a message that names the file and the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya, convert_state_dict_to_peft
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.errors import InputFileError
from sd.adapters.lora import adapter_kind
from sd.models.families import SD1, Family, family_of_configs
from sd.models.original_layout import _rename, unet_key_map

ADAPTER = "default"
TEXT_MODEL = "text_model."

# Key prefixes / fragments of LoRA files made for other model families than SD 1.x.
_OTHER_FAMILY_PREFIXES = {
    "lora_te2_": "SDXL",
    "text_encoder_2.": "SDXL",
    "transformer.": "a transformer-based model (SD3, Flux, ...)",
    "lora_transformer_": "a transformer-based model (SD3, Flux, ...)",
    "diffusion_model.": "a transformer-based model (SD3, Flux, ...)",
}
_OTHER_FAMILY_FRAGMENTS = {"add_embedding": "SDXL", "label_emb": "SDXL"}


def with_text_model_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text-encoder keys with the ``text_model.`` level that transformers < 5.6 and kohya tools expect.

    transformers >= 5.6 flattened ``CLIPTextModel``; diffusers strips the level again where the model lacks it.
    """
    return {k if k.startswith(TEXT_MODEL) else TEXT_MODEL + k: v for k, v in state_dict.items()}


def _unet_family(unet: nn.Module) -> Family:
    config = getattr(unet, "config", None)
    return family_of_configs(dict(config), None, "the UNet") if config is not None else SD1


def _kohya_unet_rename(unet: nn.Module, family: Family):
    """Diffusers UNet module name -> the name kohya files of the family use (SDXL: the original layout's)."""
    if family.kohya_unet_layout != "original":
        return lambda name: name
    prefixes = unet_key_map(unet.config)
    return lambda name: _rename(name + ".", prefixes)[:-1] if _rename(name + ".", prefixes) else name


def _alphas(model: nn.Module, kohya_prefix: str, add_text_model: bool = False, rename=None) -> dict[str, float]:
    """Kohya module name -> the alpha that gives each adapter's trained scale (kohya scales by alpha / rank)."""
    alphas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.r:
            if add_text_model and not name.startswith(TEXT_MODEL):
                name = TEXT_MODEL + name
            name = rename(name) if rename is not None else name
            alphas[kohya_prefix + name.replace(".", "_")] = module.scaling[ADAPTER] * module.r[ADAPTER]
    return alphas


def kohya_layers(
    unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None
) -> dict[str, BaseTunerLayer]:
    """Kohya / LyCORIS module name (``lora_unet_<name with _>``, ``lora_te_text_model_<...>``; the family's names, as
    :func:`kohya_lora_state_dict` writes them) -> peft adapter layer, for every layer that holds the trained adapter."""
    family = _unet_family(unet)
    rename = _kohya_unet_rename(unet, family)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "r", {}):
            layers["lora_unet_" + rename(name).replace(".", "_")] = module
    for index, model in enumerate((text_encoder, text_encoder_2)):
        for name, module in model.named_modules() if model is not None else []:
            if isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "r", {}):
                name = name if name.startswith(TEXT_MODEL) else TEXT_MODEL + name  # kohya's CLIP names have the level
                layers[family.kohya_te_prefixes[index] + name.replace(".", "_")] = module
    return layers


def dora_scale_for_file(layer: LoraLayer) -> Tensor:
    """A DoRA layer's magnitude as the ``dora_scale`` a kohya file carries, (out, 1, ...) on the output axis.

    peft's DoRA weight is ``m / ||W + dW|| * (W + dW)``, the norm taken per output row (dW = scale * B A). ComfyUI
    (``weight_decompose``, output-axis case: ``dora_scale.shape[0]`` is the output size) computes
    ``(W + dW) * dora_scale / ||W||``, the norm of the base weight W, not of W + dW. The file's scale is therefore
    ``m * ||W|| / ||W + dW||``, so that ComfyUI renders the trained weight (for this base model).
    """
    base = layer.get_base_layer().weight.detach().float()
    merged = base + layer.get_delta_weight(ADAPTER).detach().float().reshape(base.shape)
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().reshape(-1)
    rows = lambda w: w.reshape(w.shape[0], -1).norm(dim=1)  # noqa: E731
    scale = magnitude * rows(base) / rows(merged)
    return scale.reshape(base.shape[0], *[1] * (base.dim() - 1)).contiguous()


def kohya_lora_state_dict(
    unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None
) -> dict[str, Tensor]:
    """The UNet (and text-encoder) adapters in kohya's format, with the trained alpha of each module (and DoRA's
    ``dora_scale``); module names and text-encoder prefixes as the UNet's family's kohya files have them
    (:class:`~sd.models.families.Family`)."""
    family = _unet_family(unet)
    rename = _kohya_unet_rename(unet, family)
    unet_sd = get_peft_model_state_dict(unet, save_embedding_layers=False)
    peft = {}
    for k, v in unet_sd.items():
        module, _, rest = k.partition(".lora_")
        peft[f"unet.{rename(module)}.lora_{rest}"] = v
    alphas = _alphas(unet, "lora_unet_", rename=rename)
    # diffusers' converter names the encoders lora_te1_ / lora_te2_ (SDXL's); the family's names are set below
    for index, (name, model) in enumerate((("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))):
        if model is not None:
            te = with_text_model_prefix(get_peft_model_state_dict(model, save_embedding_layers=False))
            peft |= {f"{name}.{k}": v for k, v in te.items()}
            alphas |= _alphas(model, family.kohya_te_prefixes[index], add_text_model=True)
    peft = {k: v for k, v in peft.items() if "lora_magnitude_vector" not in k}  # DoRA: dora_scale, below
    converted_prefixes = dict(zip(("lora_te1_", "lora_te2_"), family.kohya_te_prefixes, strict=False))
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        for converted, prefix in converted_prefixes.items():
            if key.startswith(converted):
                key = prefix + key.removeprefix(converted)
        kohya[key] = value.detach().contiguous()
    for module in {k.split(".")[0] for k in kohya}:
        if module not in alphas:
            raise KeyError(f"No LoRA layer found for the kohya module {module!r}.")
        kohya[f"{module}.alpha"] = torch.tensor(float(alphas[module]))
    for module, layer in kohya_layers(unet, text_encoder, text_encoder_2).items():
        if layer.use_dora.get(ADAPTER):
            kohya[f"{module}.dora_scale"] = dora_scale_for_file(layer)
    return kohya


def lycoris_state_dict(
    unet: nn.Module, text_encoder: nn.Module | None = None, text_encoder_2: nn.Module | None = None
) -> dict[str, Tensor]:
    """LoHa / LoKr adapters under LyCORIS' key names, as AUTOMATIC1111 and ComfyUI read them.

    peft's weights have LyCORIS' names and shapes; each module's update is ``(w1_a w1_b) * (w2_a w2_b) * alpha / r``
    (LoHa, ``r`` = ``hada_w1_b``'s rows) or ``kron(w1, w2) * alpha / r`` (LoKr). For LoKr, those tools take
    ``r`` from ``lokr_w2_b`` (or ``lokr_w1_b``) and scale by 1 when neither factor is decomposed; peft scales by
    alpha / r always, so then the scale is folded into ``lokr_w1``.
    """
    state = {}
    for module, layer in kohya_layers(unet, text_encoder, text_encoder_2).items():
        for name in layer.adapter_layer_names:
            weights = getattr(layer, name)
            if ADAPTER in weights:
                state[f"{module}.{name}"] = weights[ADAPTER].detach().float().contiguous()
        if any(k.endswith(("hada_t1", "hada_t2", "lokr_t2")) and k.startswith(module + ".") for k in state):
            raise NotImplementedError(f"{module}: Tucker-decomposed convolution weights are not exported.")
        alpha = float(layer.alpha[ADAPTER])
        if isinstance(layer, LoKrLayer) and f"{module}.lokr_w1" in state and f"{module}.lokr_w2" in state:
            state[f"{module}.lokr_w1"] = state[f"{module}.lokr_w1"] * layer.scaling[ADAPTER]
            alpha = float(layer.r[ADAPTER])  # read by no tool here (nothing is decomposed); kept for the format
        state[f"{module}.alpha"] = torch.tensor(alpha)
    return state


def save_kohya_lora(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    path: str | Path,
    base_model: str | None = None,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write :func:`kohya_lora_state_dict` (LoRA, DoRA) or :func:`lycoris_state_dict` (LoHa, LoKr) as a
    ``.safetensors`` with kohya's ``ss_*`` header entries."""
    config = unet.peft_config[ADAPTER]
    kind = adapter_kind(config)
    lycoris = kind in ("loha", "lokr")
    family = _unet_family(unet)
    architecture = "stable-diffusion-v1" if family.name != "sdxl" else family.modelspec_architecture(False)
    metadata = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(float(config.alpha if lycoris else config.lora_alpha)),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_network_train_unet_only": str(text_encoder is None and text_encoder_2 is None),
        "modelspec.architecture": f"{architecture}/lora",
    }
    if kind != "lora":  # plain LoRA's header as before
        metadata["ss_network_args"] = json.dumps({"algo": kind} if lycoris else {"dora_wd": "True"})
    if base_model:
        metadata["ss_sd_model_name"] = str(base_model)
    if lycoris:
        state = lycoris_state_dict(unet, text_encoder, text_encoder_2)
    else:
        state = kohya_lora_state_dict(unet, text_encoder, text_encoder_2)
    save_file(state, str(path), metadata=metadata)
    return Path(path)


# ----------------------------------------------------------------------------------------------- loading, checked
def _peft_layout(path: Path, state_dict: dict[str, Tensor], unet: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The file's weights as peft keys (``<module>.lora_A.weight``) per part, converted as diffusers converts them
    for the UNet's family."""
    model_family = _unet_family(unet)
    for key in state_dict:
        family = next((f for p, f in _OTHER_FAMILY_PREFIXES.items() if key.startswith(p)), None) or next(
            (f for p, f in _OTHER_FAMILY_FRAGMENTS.items() if p in key), None
        )
        if family is not None and family != model_family.label:
            raise InputFileError(
                f"{str(path)!r} is a LoRA for {family} (keys such as {key!r}), not for this {model_family.label} model."
            )
    pipeline_class = model_family.pipeline_type()
    try:
        converted, _ = pipeline_class.lora_state_dict(dict(state_dict), unet_config=unet.config)
    except Exception as e:
        raise InputFileError(f"{str(path)!r} is no LoRA file diffusers can read for {model_family.label}: {e}") from e
    unknown = [k for k in converted if not k.startswith(("unet.", "text_encoder.", "text_encoder_2."))]
    if unknown or not converted:
        raise InputFileError(
            f"{str(path)!r} holds no LoRA weights for a UNet or text encoder (keys such as {(unknown or ['none'])[0]!r})."
        )
    unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    parts = {"unet": unet}
    for name in ("text_encoder", "text_encoder_2"):
        te = {k.removeprefix(f"{name}."): v for k, v in converted.items() if k.startswith(f"{name}.")}
        parts[name] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te)) if te else {}
    return parts


def _layer_mismatch(model: nn.Module, key: str, weight: Tensor) -> str | None:
    """Why the LoRA weight ``key`` (peft layout) does not fit ``model``, or None if it does."""
    module_name, _, kind = key.partition(".lora_")
    if not kind.startswith(("A.", "B.")):
        return None  # magnitude vectors and the like are not checked here
    try:
        layer = model.get_submodule(module_name)
    except AttributeError:
        return f"`{module_name}` is no layer of it"
    layer = getattr(layer, "base_layer", layer)
    if isinstance(layer, nn.Linear):
        features = {"A": ("input features", layer.in_features), "B": ("output features", layer.out_features)}
    elif isinstance(layer, nn.Conv2d):
        features = {"A": ("input channels", layer.in_channels), "B": ("output channels", layer.out_channels)}
    else:
        return f"`{module_name}` is a {type(layer).__name__}, which takes no LoRA"
    what, expected = features[kind[0]]
    got = weight.shape[1] if kind[0] == "A" else weight.shape[0]
    if got != expected:
        return f"`{module_name}` has {expected} {what}, the LoRA {got}"
    return None


def check_lora_file(
    path: str | Path, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None
) -> Path:
    """Check that a LoRA ``.safetensors`` file fits ``unet`` / ``text_encoder`` (/ SDXL's ``text_encoder_2``); return
    the file. Raises ``ValueError`` naming it. (An export folder: :func:`sd.export.layout.resolve_lora_file`
    gives its file.)"""
    path = Path(path)
    parts = _peft_layout(path, load_file(str(path)), unet)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name in ("text_encoder", "text_encoder_2"):
        if models[name] is not None and not hasattr(models[name], "text_model"):  # transformers >= 5.6 flattened it
            parts[name] = {k.removeprefix(TEXT_MODEL): v for k, v in parts[name].items()}
        elif models[name] is None and parts[name]:
            raise InputFileError(f"{str(path)!r} holds {name} LoRA weights, but this model has no {name}.")
    problems = [
        f"{name}: {why}"
        for name, weights in parts.items()
        for key, weight in weights.items()
        if (why := _layer_mismatch(models[name], key, weight)) is not None
    ]
    if problems:
        raise InputFileError(
            f"{str(path)!r} does not fit this model; it was made for another architecture or base model "
            f"({len(problems)} mismatches, e.g. {'; '.join(problems[:3])})."
        )
    return path
