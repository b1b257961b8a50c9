"""Training on cached latents and text embeddings gives the same loss as encoding every step, and loads no encoder."""

from __future__ import annotations

import pytest
import torch

from datamodules.cached_dataset import CachedLatentDataset, WithTextEmbeddings, collate_latents
from datamodules.caches import latent_cache, text_embedding_cache
from datamodules.datasets import DreamBoothDataset, collate_dreambooth
from datamodules.images import list_images
from lightning_modules.dreambooth import DreamBoothModule

MODEL, INSTANCE, CLASS = "builtin:tiny-sd", "a photo of sks ball", "a photo of ball"


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_cached_and_uncached_give_the_same_loss(tmp_path, toy_subject_dir, class_images_dir, use_lora):
    ds = DreamBoothDataset(
        list_images(toy_subject_dir)[:2],
        INSTANCE,
        64,
        class_images=list_images(class_images_dir)[:2],
        class_prompt=CLASS,
    )
    examples = [ds[0], ds[1]]
    uncached = collate_dreambooth(examples)  # (4, 3, 64, 64) pixels
    table = latent_cache(ds.instance_images + ds.class_images, 64, False, MODEL, cache_dir=tmp_path)
    embeds = text_embedding_cache([INSTANCE, CLASS], MODEL, cache_dir=tmp_path)
    cached_ds = CachedLatentDataset(ds, table)
    cached = WithTextEmbeddings(collate_latents, embeds)([cached_ds[0], cached_ds[1]])
    assert cached["prompts"] == uncached["prompts"] and torch.equal(cached["is_prior"], uncached["is_prior"])

    module = DreamBoothModule(MODEL, use_lora=use_lora)
    module.configure_model()
    assert module.vae is None and module.text_encoder is None  # nothing frozen is loaded up front
    module.frozen("vae"), module.frozen("text_encoder")  # loaded before seeding: loading may draw random numbers
    losses = []
    for batch in (uncached, cached, uncached):
        torch.manual_seed(1)
        losses.append(module.training_step(batch, 0).item())
    assert losses[0] == losses[2]  # the seed fixes the draws
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    torch.manual_seed(2)
    assert module.training_step(cached, 0).item() != pytest.approx(losses[1], rel=1e-3)  # other draws, other loss


def test_training_on_cached_inputs_loads_no_frozen_encoder(tmp_path, toy_subject_dir, monkeypatch):
    ds = DreamBoothDataset(list_images(toy_subject_dir)[:1], INSTANCE, 64)
    table = latent_cache(ds.instance_images, 64, True, MODEL, cache_dir=tmp_path)
    collate = WithTextEmbeddings(collate_latents, text_embedding_cache([INSTANCE], MODEL, cache_dir=tmp_path))
    module = DreamBoothModule(MODEL, use_lora=True)
    module.configure_model()

    def refuse(*args, **kwargs):
        raise AssertionError("a frozen encoder was loaded")

    monkeypatch.setattr("lightning_modules.dreambooth.load_parts", refuse)
    loss = module.training_step(collate([CachedLatentDataset(ds, table)[0]]), 0)
    loss.backward()
    assert module.vae is None and module.text_encoder is None and torch.isfinite(loss)


def test_cached_text_embeddings_with_a_trained_text_encoder_are_refused(tmp_path, toy_subject_dir):
    ds = DreamBoothDataset(list_images(toy_subject_dir)[:1], INSTANCE, 64)
    batch = WithTextEmbeddings(collate_dreambooth, text_embedding_cache([INSTANCE], MODEL, cache_dir=tmp_path))([ds[0]])
    module = DreamBoothModule(MODEL, use_lora=True, train_text_encoder=True)
    module.configure_model()
    with pytest.raises(ValueError, match="data.cache_text_embeddings"):
        module.training_step(batch, 0)


def test_release_frozen_drops_them_on_the_cpu_and_frozen_reloads(tmp_path):
    module = DreamBoothModule(MODEL, use_lora=True)
    module.configure_model()
    vae = module.frozen("vae")
    assert module.parts.vae is vae and not any(p.requires_grad for p in vae.parameters())
    parts = module.sampling_parts()
    assert parts.text_encoder is module.text_encoder is not None
    module.release_frozen()
    assert module.vae is None and module.text_encoder is None and module.parts.vae is None
    assert "vae" not in dict(module.named_children())
    assert module.frozen("vae") is not vae  # reloaded from the base model (nothing parked on a CPU run)
