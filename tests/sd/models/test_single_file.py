"""Single-file checkpoints as base models: loaded through diffusers' ``from_single_file``, pickles never run code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from sd.models.loading import check_model_path, load_components, load_pipeline
from sd.models.single_file import check_single_file, load_single_file_pipeline

CONFIG = "builtin:tiny-sd"


def _render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    # guidance_scale 1: no unconditional pass, half the work on a shared 2-core CPU
    return pipe("a photo of sks ball", num_inference_steps=2, guidance_scale=1.0, generator=g, output_type="np").images


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle ever runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_single_file_renders_like_the_diffusers_folder(tiny_single_file):
    single = load_pipeline(str(tiny_single_file), single_file_config=CONFIG)
    folder = load_pipeline(CONFIG)
    # Bitwise-equal weights and configs (test below); the UNet's output still differs in the last bits (~5e-7 seen),
    # as CPU kernels may take other paths for differently allocated tensors.
    np.testing.assert_allclose(_render(single), _render(folder), atol=1e-5)


def test_components_from_a_single_file(tiny_single_file):
    parts = load_components(str(tiny_single_file), single_file_config=CONFIG)
    base = load_components(CONFIG)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(parts, name).state_dict(), getattr(base, name).state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert dict(parts.noise_scheduler.config) == dict(base.noise_scheduler.config)


def test_ckpt_of_plain_tensors_loads(tiny_single_file, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_single_file), "global_step": 1}, ckpt)
    assert check_model_path(str(ckpt)) == str(ckpt)
    parts, base = load_components(str(ckpt), single_file_config=CONFIG), load_components(CONFIG)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(parts, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_ckpt_that_would_run_code_is_refused_and_never_runs(tiny_single_file, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(tiny_single_file), "callbacks": Payload(str(marker))}, ckpt)
    with pytest.raises(ValueError, match=r"Refusing to load .*evil\.ckpt.*execute code"):
        load_components(str(ckpt), single_file_config=CONFIG)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_pipeline(str(ckpt), single_file_config=CONFIG)
    assert not marker.exists(), "the pickle payload ran"


def test_other_model_families_and_partial_files_are_named(tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, sdxl)
    with pytest.raises(ValueError, match=r"sdxl\.safetensors.*SDXL"):
        check_single_file(sdxl)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, unet_only)
    with pytest.raises(ValueError, match=r"unet_only\.safetensors.*lacks the VAE.*text encoder"):
        load_pipeline(str(unet_only), single_file_config=CONFIG)


def test_config_that_does_not_fit_is_named(tiny_single_file, tmp_path):
    other = tmp_path / "other_config"
    pipe = load_pipeline(CONFIG)
    pipe.unet.register_to_config(cross_attention_dim=64)
    pipe.save_config(other)
    pipe.unet.save_config(other / "unet")
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(pipe, name).save_pretrained(other / name)
    with pytest.raises(ValueError, match=r"tiny\.safetensors.*other_config"):
        load_single_file_pipeline(tiny_single_file, str(other))


def test_missing_single_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_model_name_or_path.*gone\.safetensors"):
        load_components(str(tmp_path / "gone.safetensors"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no single-file checkpoint"):
        check_model_path(str(tmp_path / "weights.bin"))
