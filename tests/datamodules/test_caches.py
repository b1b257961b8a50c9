"""Latent and text-embedding caches: what the batches carry, when a cache is rebuilt, and that it is never stale."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from PIL import Image

import datamodules.caches as caches
from datamodules import DreamBoothDataModule
from datamodules.cached_dataset import CachedLatentDataset
from datamodules.caches import encode_latent_table, latent_cache, text_embedding_cache
from datamodules.datasets import DreamBoothDataset, image_transform
from datamodules.images import list_images, load_image
from sd.models.loading import load_part

MODEL, INSTANCE, CLASS = "builtin:tiny-sd", "a photo of sks ball", "a photo of ball"


@pytest.fixture
def encodes(monkeypatch) -> list[int]:
    """Counts the images each VAE encoding pass of a cache build sees (an empty list: no cache was built)."""
    calls: list[int] = []
    real = caches.encode_latent_table

    def counting(vae, images, *args, **kwargs):
        calls.append(len(images))
        return real(vae, images, *args, **kwargs)

    monkeypatch.setattr(caches, "encode_latent_table", counting)
    return calls


def _images(tmp_path, toy_subject_dir):
    folder = tmp_path / "images"
    shutil.copytree(toy_subject_dir, folder)
    return list_images(folder)


def test_cached_batches_carry_latents_and_text_embeddings(tmp_path, toy_subject_dir, class_images_dir):
    class_dir = tmp_path / "class"
    shutil.copytree(class_images_dir, class_dir)
    dm = DreamBoothDataModule(
        str(toy_subject_dir), INSTANCE, str(class_dir), CLASS, num_class_images=4, resolution=64, batch_size=2,
        pretrained_model_name_or_path=MODEL, random_flip=True, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = {"latent_mean", "latent_std", "prompt_embeds", "prompts", "is_prior", "original_sizes", "crop_top_lefts"}
    assert set(batch) == expected  # no pixels, no VAE
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (4, 4, 16, 16)  # tiny-sd: VAE factor 4
    assert (batch["latent_std"] > 0).all()
    assert batch["prompt_embeds"].shape == (4, 77, 32)
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["prompts"] == [INSTANCE, INSTANCE, CLASS, CLASS]
    embeds = {p: e for p, e in zip(batch["prompts"], batch["prompt_embeds"], strict=True)}
    assert not torch.equal(embeds[INSTANCE], embeds[CLASS])
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [f.split("-")[0] + f[f.rindex(".") :] if "." in f else f for f in files] == [
        "latents.json", "latents.safetensors", "text",
    ]  # fmt: skip
    entries = sorted(p.name.split("-")[0] + p.suffix for p in (tmp_path / "cache" / "text").iterdir())
    assert entries == ["prompt.json", "prompt.json", "prompt.safetensors", "prompt.safetensors"]  # one per prompt
    sidecar = json.loads((tmp_path / "cache" / files[0]).read_text())
    assert sidecar["resolution"] == 64 and sidecar["random_flip"] and len(sidecar["images"]) == 8


def test_cache_matches_encoding_and_is_reused(tmp_path, toy_subject_dir, encodes, monkeypatch):
    images = _images(tmp_path, toy_subject_dir)
    table = latent_cache(images, 64, True, MODEL, cache_dir=tmp_path / "c")
    assert encodes == [4] and table.mean.shape == (4, 2, 4, 16, 16)

    vae = load_part(MODEL, "vae")
    pixels = image_transform(64)(load_image(images[1]))[None]  # (1, 3, 64, 64)
    with torch.no_grad():
        dist = vae.encode(pixels.flip(-1)).latent_dist
    sf = vae.config.scaling_factor
    torch.testing.assert_close(table.mean[1, 1], dist.mean[0] * sf, atol=1e-5, rtol=1e-5)  # orientation 1: flipped
    torch.testing.assert_close(table.std[1, 1], dist.std[0] * sf, atol=1e-5, rtol=1e-5)

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded although the cache was there")

    monkeypatch.setattr("sd.models.loading.load_part", no_vae)
    again = latent_cache(images, 64, True, MODEL, cache_dir=tmp_path / "c")
    assert encodes == [4] and torch.equal(again.mean, table.mean)


def test_changing_images_resolution_flip_or_model_rebuilds(tmp_path, toy_subject_dir, encodes):
    images = _images(tmp_path, toy_subject_dir)
    cache = tmp_path / "c"
    first = latent_cache(images, 64, False, MODEL, cache_dir=cache)
    latent_cache(images, 64, False, MODEL, cache_dir=cache)
    assert len(encodes) == 1

    assert latent_cache(images, 32, False, MODEL, cache_dir=cache).mean.shape == (4, 1, 4, 8, 8)  # resolution
    assert len(encodes) == 2
    latent_cache(images, 64, True, MODEL, cache_dir=cache)  # flip
    assert len(encodes) == 3
    latent_cache(images, 64, False, "builtin:tiny-sd-v", cache_dir=cache)  # another base model
    assert len(encodes) == 4
    latent_cache(images[:3], 64, False, MODEL, cache_dir=cache)  # another image set
    assert len(encodes) == 5

    Image.new("RGB", (64, 64), (255, 0, 0)).save(images[2])  # same file name, new content
    edited = latent_cache(images, 64, False, MODEL, cache_dir=cache)
    assert len(encodes) == 6
    assert torch.equal(edited.mean[:2], first.mean[:2]) and not torch.equal(edited.mean[2], first.mean[2])


def test_a_damaged_cache_file_is_rebuilt(tmp_path, toy_subject_dir, encodes, caplog):
    images = _images(tmp_path, toy_subject_dir)
    cache = tmp_path / "c"
    table = latent_cache(images, 64, False, MODEL, cache_dir=cache)
    (data,) = cache.glob("*.safetensors")
    data.write_bytes(data.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="datamodules.caches"):
        rebuilt = latent_cache(images, 64, False, MODEL, cache_dir=cache)
    assert len(encodes) == 2 and "unreadable cache file" in caplog.text
    torch.testing.assert_close(rebuilt.mean, table.mean)
    assert not list(cache.glob(".*tmp"))  # written atomically: no temporary file left


def test_random_crop_turns_the_latent_cache_off(tmp_path, toy_subject_dir, encodes, caplog):
    dm = DreamBoothDataModule(
        str(toy_subject_dir), INSTANCE, with_prior_preservation=False, resolution=64, center_crop=False,
        pretrained_model_name_or_path=MODEL, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datamodules.dreambooth"):
        dm.setup("fit")
    assert "random crops" in caplog.text and encodes == []
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" in batch and "latent_mean" not in batch and "prompt_embeds" in batch


def test_flip_picks_both_cached_orientations(tmp_path, toy_subject_dir):
    images = _images(tmp_path, toy_subject_dir)[:1]
    vae = load_part(MODEL, "vae")
    table = encode_latent_table(vae, images, 64, random_flip=True)
    ds = CachedLatentDataset(DreamBoothDataset(images, INSTANCE, 64), table)
    torch.manual_seed(0)
    picked = [ds[0]["instance"][0] for _ in range(40)]
    flipped = sum(torch.equal(m, table.mean[0, 1]) for m in picked)
    assert 5 < flipped < 35 and flipped + sum(torch.equal(m, table.mean[0, 0]) for m in picked) == 40


def test_text_embeddings_equal_the_text_encoder(tmp_path):
    from sd.training.diffusion import encode_text, tokenize

    embeds = text_embedding_cache([INSTANCE, CLASS, INSTANCE], MODEL, cache_dir=tmp_path)
    assert sorted(embeds) == sorted([INSTANCE, CLASS])
    with torch.no_grad():
        direct = encode_text(load_part(MODEL, "text_encoder"), tokenize(load_part(MODEL, "tokenizer"), [CLASS]))
    torch.testing.assert_close(embeds[CLASS], direct[0])


def test_hub_models_are_fingerprinted_by_commit(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    snapshot = tmp_path / "snapshots" / "0123abc"
    (snapshot / "tokenizer").mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')

    def fake_download(repo_id, filename, revision=None):
        assert repo_id == "org/model" and revision == "main"
        if not (snapshot / filename).is_file():
            raise EntryNotFoundError(filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    fp = caches.part_fingerprint("org/model", "tokenizer", "main", None)
    assert fp["commit"] == "0123abc" and fp["config"] == {"model_max_length": 77}
