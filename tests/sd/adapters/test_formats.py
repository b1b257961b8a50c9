"""Kohya LoRA files, and loading LoRA files with a check that names the file and the mismatch."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sd.adapters.formats import kohya_lora_state_dict, save_kohya_lora
from sd.adapters.lora import (
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    inject_lora,
    lora_config,
    lora_state_dict,
)
from sd.export.folder import export_lora, load_lora_into_pipeline
from sd.export.layout import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from sd.models.builtin import model_configs
from sd.models.loading import load_components, load_pipeline
from sd.render.pipeline import build_pipeline

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
RANK, ALPHA = 4, 2.0


def _render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    # guidance_scale 1: no unconditional pass, half the work on a shared 2-core CPU
    return pipe("a photo of sks ball", num_inference_steps=2, guidance_scale=1.0, generator=g, output_type="np").images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny UNet + text encoder with LoRA (alpha != rank) whose up-weights are random, as after training."""
    parts = load_components("builtin:tiny-sd")
    inject_lora(parts.unet, lora_config(RANK, ALPHA, 0.0, UNET_TARGET_MODULES))
    inject_lora(parts.text_encoder, lora_config(RANK, ALPHA, 0.0, TEXT_ENCODER_TARGET_MODULES))
    gen = torch.Generator().manual_seed(0)
    for model in (parts.unet, parts.text_encoder):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.3
    out = export_lora(parts.unet, parts.text_encoder, tmp_path_factory.mktemp("run") / "export", "builtin:tiny-sd")
    return parts, out.parent


def test_kohya_keys_and_alphas(trained):
    parts, out = trained
    weights = load_file(out / KOHYA_WEIGHT_NAME)
    assert all(KOHYA_KEY.match(k) for k in weights), [k for k in weights if not KOHYA_KEY.match(k)][:3]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in weights
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in weights
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in weights
    modules = {k.split(".")[0] for k in weights}
    # The tiny UNet has 4 transformer blocks of 2 attention layers, the CLIP encoder 2 layers; 4 projections each.
    assert len(modules) == 4 * 2 * 4 + 2 * 4
    for module in modules:
        assert weights[f"{module}.alpha"].item() == ALPHA
        assert weights[f"{module}.lora_down.weight"].shape[0] == RANK
        assert weights[f"{module}.lora_up.weight"].shape[1] == RANK
    assert not any(k.startswith("lora_te_") for k in kohya_lora_state_dict(parts.unet))


def test_kohya_and_diffusers_files_render_like_the_trained_modules(trained):
    parts, out = trained
    live = _render(build_pipeline(parts, sampler="pndm"))
    base = _render(load_pipeline("builtin:tiny-sd"))
    assert np.abs(live - base).max() > 1e-3
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = load_lora_into_pipeline(load_pipeline("builtin:tiny-sd"), out / name)
        np.testing.assert_allclose(_render(pipe), live, atol=1e-5, err_msg=name)


def test_lora_for_another_cross_attention_width_is_named(tmp_path):
    cfg = model_configs("tiny-sd")["unet"] | {"cross_attention_dim": 64}
    unet = UNet2DConditionModel(**cfg)
    inject_lora(unet, lora_config(RANK, None, 0.0, UNET_TARGET_MODULES))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora_state_dict(unet), weight_name="wide.safetensors"
    )
    save_kohya_lora(unet, None, tmp_path / "wide_kohya.safetensors")
    for name in ("wide.safetensors", "wide_kohya.safetensors"):
        with pytest.raises(
            ValueError, match=rf"{name}.*another architecture.*attn2\.to_k` has 32 input features, the LoRA 64"
        ):
            load_lora_into_pipeline(load_pipeline("builtin:tiny-sd"), tmp_path / name)


def test_sdxl_lora_is_named(tmp_path):
    path = tmp_path / "sdxl_style.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
        },
        path,
    )
    with pytest.raises(ValueError, match=r"sdxl_style\.safetensors.*SDXL"):
        load_lora_into_pipeline(load_pipeline("builtin:tiny-sd"), path)


def test_lora_naming_layers_the_model_lacks(tmp_path):
    path = tmp_path / "deeper.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
        },
        path,
    )
    with pytest.raises(ValueError, match=r"deeper\.safetensors.*down_blocks\.3\..*is no layer"):
        load_lora_into_pipeline(load_pipeline("builtin:tiny-sd"), path)


def test_missing_or_unsafe_lora_files(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    with pytest.raises(FileNotFoundError, match="no_export"):
        load_lora_into_pipeline(pipe, tmp_path / "no_export")
    (tmp_path / "empty_export").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"empty_export.*{LORA_WEIGHT_NAME}"):
        load_lora_into_pipeline(pipe, tmp_path / "empty_export")
    torch.save({}, tmp_path / "lora.bin")
    with pytest.raises(ValueError, match=r"lora\.bin.*only \.safetensors"):
        load_lora_into_pipeline(pipe, tmp_path / "lora.bin")
