"""Training actually learns: the loss falls on a fixed batch, and an overfit subject is tied to its prompt."""

from __future__ import annotations

import torch

from datamodules.datasets import DreamBoothDataset, collate_dreambooth
from lightning_modules.diffusion import encode_latents, fixed_noise_error
from lightning_modules.dreambooth import DreamBoothModule


def _batch(instance_images, class_images):
    dataset = DreamBoothDataset(
        instance_images, "a photo of sks ball", 64, class_images=class_images, class_prompt="a photo of ball"
    )
    return collate_dreambooth([dataset[0]])  # one instance row + one class row


def _train(module: DreamBoothModule, batch, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        loss = module.training_step(batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _error(module: DreamBoothModule, latents, prompt: str) -> float:
    p = module.parts
    return sum(fixed_noise_error(module.unet, module.text_encoder, p.tokenizer, p.noise_scheduler, latents, prompt, s)
               for s in range(8)) / 8  # fmt: skip


def test_full_fine_tuning_lowers_the_loss_on_a_fixed_batch(toy_subject_dir, class_images_dir):
    from datamodules.images import list_images

    module = DreamBoothModule("builtin:tiny-sd", use_lora=False)
    module.configure_model()
    batch = _batch(list_images(toy_subject_dir)[:1], list_images(class_images_dir)[:1])
    torch.manual_seed(0)
    latents = encode_latents(module.vae, batch["pixel_values"])
    before = _error(module, latents, "a photo of sks ball")
    _train(module, batch, steps=30, lr=1e-3)
    after = _error(module, latents, "a photo of sks ball")
    assert after < 0.7 * before, (before, after)


def test_overfit_lora_subject_is_tied_to_its_prompt(toy_subject_dir, class_images_dir):
    from datamodules.images import list_images

    module = DreamBoothModule("builtin:tiny-sd", use_lora=True, lora_rank=8, train_text_encoder=True)
    module.configure_model()
    batch = _batch(list_images(toy_subject_dir)[:1], list_images(class_images_dir)[:1])
    torch.manual_seed(0)
    latents = encode_latents(module.vae, batch["pixel_values"][~batch["is_prior"]])  # the instance image
    base = _error(module, latents, "a photo of sks ball")
    _train(module, batch, steps=60, lr=3e-3)
    tuned = _error(module, latents, "a photo of sks ball")
    unrelated = _error(module, latents, "an oil painting of a mountain lake")
    assert tuned < 0.8 * base, (base, tuned)
    assert tuned < 0.9 * unrelated, (tuned, unrelated)
