"""The original SD 1.x layout: diffusers' own readers (``convert_ldm_*``) give back exactly what was written."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sd.models.builtin import model_configs
from sd.models.original_layout import to_original_layout, unet_to_original


def _models(name: str, device: str):
    cfg = model_configs(name)
    with torch.device(device):
        return (
            UNet2DConditionModel(**cfg["unet"]),
            AutoencoderKL(**cfg["vae"]),
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        )


def _original(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    return to_original_layout(unet.state_dict(), unet.config, vae.state_dict(), vae.config, text_encoder.state_dict())


# The SD 1.5 architecture is built on the meta device: names and shapes only, no memory.
@pytest.mark.parametrize("name,device", [("tiny-sd", "cpu"), ("sd15-random", "meta")])
def test_diffusers_reads_back_every_weight(name, device):
    unet, vae, text_encoder = _models(name, device)
    original = _original(unet, vae, text_encoder)
    for model, back in (
        (unet, convert_ldm_unet_checkpoint(original, unet.config)),
        (vae, convert_ldm_vae_checkpoint(original, vae.config)),
        (text_encoder, convert_ldm_clip_checkpoint(original)),
    ):
        expected = model.state_dict()
        back = {k.removeprefix("text_model."): v for k, v in back.items()} if model is text_encoder else back
        assert set(back) == set(expected)
        for key, value in expected.items():
            assert back[key].shape == value.shape, key
            if device == "cpu":
                assert torch.equal(back[key], value), key


def test_sd15_names_are_the_original_ones():
    original = _original(*_models("sd15-random", "meta"))
    assert infer_diffusers_model_type(original) == "v1"
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in original, key
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert not any("output_blocks.11.1.conv" in k or "input_blocks.12" in k for k in original)


def test_unknown_weight_is_an_error_not_dropped():
    unet, _, _ = _models("tiny-sd", "meta")
    with pytest.raises(KeyError, match="extra_layer.weight"):
        unet_to_original({**unet.state_dict(), "extra_layer.weight": torch.zeros(1)}, unet.config)
