"""Loading a LoRA export into the live modules, ControlNets, and the text encoder's own LoRA scale."""

from __future__ import annotations

import pytest
import torch

from sd.export.layout import resolve_lora_file
from sd.render.controlnet import TINY_CONTROLNET, check_controlnet_fits, load_controlnet
from sd.render.sampling import SamplingSettings


def test_text_encoder_scale_defaults_to_the_unet_scale():
    assert SamplingSettings(lora_scale=0.6).text_encoder_scale == 0.6
    assert SamplingSettings(lora_scale=0.6, lora_text_encoder_scale=0.0).text_encoder_scale == 0.0


def test_resolve_lora_file(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_lora_file(tmp_path / "export").name == "pytorch_lora_weights.safetensors"
    with pytest.raises(FileNotFoundError, match=r"model\.lora_weights.*missing"):
        resolve_lora_file(tmp_path / "missing")
    (tmp_path / "full" / "pipeline").mkdir(parents=True)
    (tmp_path / "full" / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"full fine-tune.*pretrained_model_name_or_path"):
        resolve_lora_file(tmp_path / "full")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        resolve_lora_file(tmp_path / "weights.bin")


def test_controlnet_loads_from_a_folder(tmp_path):
    tiny = load_controlnet(TINY_CONTROLNET)
    tiny.save_pretrained(tmp_path / "cn")
    again = load_controlnet(str(tmp_path / "cn"))
    assert not any(p.requires_grad for p in again.parameters())
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values(), strict=True))


def test_controlnet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.controlnet.*nope"):
        load_controlnet(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown built-in ControlNet"):
        load_controlnet("builtin:huge-controlnet")
    tiny = load_controlnet(TINY_CONTROLNET)

    class OtherUnet:
        config = {"cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280]}

    with pytest.raises(ValueError, match="does not fit"):
        check_controlnet_fits(tiny, OtherUnet(), "sd15-controlnet")
