"""Memory and speed switches: each changes how the UNet runs, not what it computes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from datamodules.datasets import DreamBoothDataset, collate_dreambooth
from datamodules.images import list_images
from lightning_modules.dreambooth import DreamBoothModule
from lightning_modules.memory import set_attention
from sd.models.loading import load_part


def test_eager_and_sdpa_attention_compute_the_same():
    unet = load_part("builtin:tiny-sd", "unet")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    outs = {}
    for name, cls in (("eager", AttnProcessor), ("sdpa", AttnProcessor2_0)):
        set_attention(unet, name)
        assert all(isinstance(p, cls) for p in unet.attn_processors.values())
        with torch.no_grad():
            outs[name] = unet(x, torch.tensor([10, 500]), ctx).sample
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="model.attention"):
        set_attention(unet, "flash")


def test_savers_train_the_same_loss(toy_subject_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    batch = collate_dreambooth([DreamBoothDataset(list_images(toy_subject_dir)[:1], "a photo of sks ball", 64)[0]])
    losses = {}
    for name, options in {
        "plain": {},
        "savers": {"channels_last": True, "attention": "eager", "gradient_checkpointing": True, "compile_unet": True},
    }.items():
        module = DreamBoothModule("builtin:tiny-sd", use_lora=False, **options)
        module.configure_model()
        if options:
            assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            assert module.unet.is_gradient_checkpointing
        module.frozen("vae"), module.frozen("text_encoder")
        module.unet.train()
        torch.manual_seed(0)
        loss = module.training_step(batch, 0)
        loss.backward()
        losses[name] = loss.item()
        assert module.unet.conv_in.weight.grad is not None
    assert compiled == ["UNet2DConditionModel"]  # compiled in place (names and checkpoints unchanged)
    assert losses["savers"] == pytest.approx(losses["plain"], rel=1e-4)


def test_frozen_weights_are_cast_one_by_one_and_trained_ones_kept():
    from lightning_modules.memory import cast_frozen_, release_freed_cpu_memory
    from sd.adapters.lora import UNET_TARGET_MODULES, inject_lora, lora_config

    unet = load_part("builtin:tiny-sd", "unet")  # its weights live in a memory-mapped safetensors file
    inject_lora(unet, lora_config(4, None, 0.0, UNET_TARGET_MODULES))
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    cast_frozen_(unet, torch.bfloat16)
    for name, param in unet.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and torch.equal(param, before[name])
        else:
            assert param.dtype == torch.bfloat16 and torch.equal(param, before[name].to(torch.bfloat16))
    assert release_freed_cpu_memory()  # Linux / glibc here
