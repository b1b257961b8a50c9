"""Offline models: the CLIP tokenizer written from open_clip's vocabulary and the built-in SD models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sd.models import builtin as bm
from sd.models.builtin import build_builtin, model_configs, resolve_pretrained
from sd.models.clip_tokenizer import write_clip_tokenizer

PROMPTS = [
    "a photo of sks dog",
    "A red ball, on a striped background!",
    "café",
    "It's 2024:   naïve 東京 🙂 don't",
]


# --------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_clip_tokenizer(out)
    return out


def test_tokenizer_files_and_special_tokens(tokenizer_dir):
    from transformers import CLIPTokenizer

    assert sorted(os.listdir(tokenizer_dir)) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77 and len(tok) == 49408


def test_tokenizer_ids_match_open_clip(tokenizer_dir):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    simple = SimpleTokenizer()
    reference = open_clip.tokenize(PROMPTS)  # (n, 77), padded with 0
    padded = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    for prompt, ids, ref in zip(PROMPTS, padded, reference.tolist(), strict=True):
        expected = [49406, *simple.encode(prompt), 49407]
        assert tok(prompt).input_ids == expected
        n = len(expected)
        assert len(ids) == 77
        assert ids[:n] == ref[:n] == expected
        assert ref[n:] == [0] * (77 - n)  # open_clip pads with 0 ...
        assert ids[n:] == [49407] * (77 - n)  # ... Stable Diffusion with <|endoftext|>
    assert tok.decode(tok("a photo of sks dog").input_ids, skip_special_tokens=True) == "a photo of sks dog"


def test_tokenizer_write_replaces_atomically(tokenizer_dir, tmp_path):
    out = tmp_path / "tokenizer"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_clip_tokenizer(out)
    assert not (out / "stale.txt").exists()
    assert (out / "vocab.json").read_bytes() == (tokenizer_dir / "vocab.json").read_bytes()
    assert os.listdir(tmp_path) == ["tokenizer"]  # no temporary folders left behind


# ---------------------------------------------------------------------------------------- built-in models


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, float]:
    """A cache holding builtin:tiny-sd, built once for the module; returns (cache, build seconds)."""
    import time

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(cache))
        start = time.perf_counter()
        resolve_pretrained("builtin:tiny-sd")
        return cache, time.perf_counter() - start


@pytest.fixture
def tiny_sd(built_cache, monkeypatch) -> Path:
    """``DREAMBOOTH_CACHE`` pointed at the module's cache; returns the tiny-sd folder."""
    cache, _ = built_cache
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(cache))
    return Path(resolve_pretrained("builtin:tiny-sd"))


def test_resolve_builds_a_pipeline_that_renders(tiny_sd, built_cache):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    cache, seconds = built_cache
    assert tiny_sd == cache / "builtin" / "tiny-sd-v1"
    assert sorted(p.name for p in tiny_sd.parent.iterdir()) == ["tiny-sd-v1"]  # no temporary folders left
    weights = sum(f.stat().st_size for f in tiny_sd.rglob("*.safetensors"))
    assert weights < 12e6, weights
    assert seconds < 60, seconds  # about 5 s on a laptop core; generous for busy CI machines

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer.model_max_length == 77
    image = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_second_resolve_does_not_rebuild(tiny_sd, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in [tiny_sd, *tiny_sd.rglob("*")]}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(bm, "build_builtin", fail)
    assert Path(resolve_pretrained("builtin:tiny-sd")) == tiny_sd
    assert {p: p.stat().st_mtime_ns for p in [tiny_sd, *tiny_sd.rglob("*")]} == stamps


def test_build_is_deterministic(tiny_sd, tmp_path):
    rng = torch.get_rng_state()
    build_builtin("tiny-sd", tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is left alone
    for weights in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]:
        a, b = load_file(tiny_sd / weights), load_file(tmp_path / "again" / weights)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), weights
    a, b = (
        load_file(tiny_sd / "text_encoder/model.safetensors"),
        load_file(tmp_path / "again/text_encoder/model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_v_prediction_variant_differs_only_in_scheduler():
    from diffusers import DDPMScheduler

    eps, v = model_configs("tiny-sd"), model_configs("builtin:tiny-sd-v")
    assert v["scheduler"]["prediction_type"] == "v_prediction"
    assert {k: c for k, c in v.items() if k != "scheduler"} == {k: c for k, c in eps.items() if k != "scheduler"}
    assert DDPMScheduler.from_config(v["scheduler"]).config.prediction_type == "v_prediction"
    assert bm.builtin_path("tiny-sd-v").name == "tiny-sd-v-v1"


def test_unknown_builtin_lists_known_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown built-in model") as err:
        resolve_pretrained("builtin:huge-sd")
    for name in ["builtin:tiny-sd", "builtin:tiny-sd-v", "builtin:sd15-random"]:
        assert name in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "/models/sd15", "./local", "model.safetensors", ""]
)
def test_other_names_pass_through(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    assert resolve_pretrained(name) == name
    assert not any(tmp_path.iterdir())


def _fake_build(name, out_dir):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "model_index.json").write_text(json.dumps({"built_by": os.getpid()}))


def test_race_keeps_the_first_finished_build(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    target = bm.builtin_path("tiny-sd")

    def racing_build(name, out_dir):  # another process finishes while we build
        _fake_build(name, target)
        (target / "winner").write_text("")
        _fake_build(name, out_dir)

    monkeypatch.setattr(bm, "build_builtin", racing_build)
    assert Path(resolve_pretrained("builtin:tiny-sd")) == target
    assert (target / "winner").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # ours was discarded


def test_incomplete_leftover_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    target = bm.builtin_path("tiny-sd")
    (target / "unet").mkdir(parents=True)  # e.g. a copy interrupted half-way: no model_index.json
    monkeypatch.setattr(bm, "build_builtin", _fake_build)
    assert Path(resolve_pretrained("builtin:tiny-sd")) == target
    assert (target / "model_index.json").is_file() and not (target / "unet").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_cli_prints_the_folder(tiny_sd, capsys, tmp_path, monkeypatch):
    bm.main(["tiny-sd"])
    assert capsys.readouterr().out.strip() == str(tiny_sd)
    monkeypatch.setattr(bm, "build_builtin", _fake_build)
    bm.main(["builtin:tiny-sd-v", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "model_index.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("")
    with pytest.raises(SystemExit):
        bm.main(["tiny-sd", "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "keep.txt").exists()
    with pytest.raises(SystemExit):
        bm.main(["huge-sd"])


def test_sd15_random_has_the_sd15_architecture():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model_configs("sd15-random")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(unet) == 859_520_964  # the published SD 1.5 UNet
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert next(unet.parameters()).is_meta


# ------------------------------------------------------------------------------------- sd_loading entry


def test_load_components_from_builtin(tiny_sd):
    from diffusers import DDPMScheduler

    from sd.models.loading import load_components

    c = load_components("builtin:tiny-sd")
    assert isinstance(c.noise_scheduler, DDPMScheduler)
    assert c.noise_scheduler.config.prediction_type == "epsilon"
    assert c.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size == 32
    assert c.unet.dtype == c.text_encoder.dtype == c.vae.dtype == torch.float32
    ids = c.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert c.text_encoder(ids)[0].shape == (1, 77, 32)


def test_check_model_path_errors_clearly(tmp_path):
    from sd.models.loading import check_model_path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_path(str(tmp_path / "missing"))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        check_model_path(str(tmp_path / "not_a_model"))
    assert (
        check_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_small_sd_is_a_consistent_128px_model():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = model_configs("small-sd")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
    factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    assert cfg["unet"]["sample_size"] * factor == cfg["vae"]["sample_size"] == 128
    assert cfg["unet"]["cross_attention_dim"] == cfg["text_encoder"]["hidden_size"]
    assert sum(p.numel() for p in unet.parameters()) == 12_527_748  # ~60x tiny-sd's UNet
    assert sum(p.numel() for p in vae.parameters()) < 1_000_000  # the UNet, not the VAE, dominates a step
