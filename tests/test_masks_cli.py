"""Loss masks through the CLI: photo_mask.png beside a photo or its alpha channel (data.alpha_mask), the mask cropped
and flipped with its photo (pixels and cached latents), class rows unmasked, resume bit for bit, bad masks named,
and photos without masks training as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import datamodules.caches
import datamodules.dreambooth
from core.errors import InputFileError
from datamodules.datasets import DreamBoothDataset
from datamodules.images import list_images
from sd.training.diffusion import dreambooth_loss
from tests.helpers import RecordPrompts
from train import cli_main

QUIET = (
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--metrics.enabled=false",
    "--trainer.callbacks+=tests.helpers.RecordPrompts",
)


def _photos(tmp_path: Path, toy_subject_dir: Path, name: str = "photos") -> Path:
    folder = tmp_path / name
    shutil.copytree(toy_subject_dir, folder)
    return folder


def _left_half_masks(folder: Path) -> dict[str, np.ndarray]:
    """A mask for every photo: white on the left half (an asymmetric mask, so a flip shows)."""
    masks = {}
    for photo in sorted(folder.glob("*.png")):
        w, h = Image.open(photo).size
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask, "L").save(photo.with_name(f"{photo.stem}_mask.png"))
        masks[photo.name] = mask
    return masks


def _recorded(cli) -> RecordPrompts:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordPrompts))


def _export(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_masked_loss_ignores_what_the_mask_leaves_out():
    pred, target = torch.zeros(3, 4, 8, 8), torch.zeros(3, 4, 8, 8)
    target[:, :, :, 4:] = 1.0  # errors only on the right half of the latent grid...
    is_prior = torch.tensor([False, False, True])
    weight = torch.ones(3, 1, 32, 32)
    weight[:2, :, :, 16:] = 0  # ...which the instance rows' masks (at 4x the latent size) leave out
    terms = dreambooth_loss(pred, target, is_prior, 1.0, weight)
    assert float(terms.instance) == 0.0 and float(terms.prior) == pytest.approx(0.5)
    plain = dreambooth_loss(pred, target, is_prior, 1.0)
    ones = dreambooth_loss(pred, target, is_prior, 1.0, torch.ones(3, 1, 32, 32))
    assert torch.allclose(ones.loss, plain.loss) and float(plain.instance) == pytest.approx(0.5)


def test_mask_files_are_not_photos_and_follow_random_crops_and_flips(tmp_path, toy_subject_dir):
    folder = _photos(tmp_path, toy_subject_dir)
    for photo in sorted(folder.glob("*.png")):  # wide photos, each masked by its red channel: a crop or flip shows
        wide = Image.open(photo).convert("RGB").crop((0, 12, 64, 52))  # 64 x 40
        wide.save(photo)
        wide.getchannel("R").save(photo.with_name(f"{photo.stem}_mask.png"))
    photos = list_images(folder)
    assert photos and not any(p.stem.endswith("_mask") for p in photos)
    data = DreamBoothDataset(photos, "a photo of sks ball", 32, center_crop=False, random_flip=True, masks=True)
    for i in range(8):
        torch.manual_seed(i)
        example = data[i % len(photos)]
        red = (example["instance"][0][0] + 1) / 2  # [-1, 1] -> [0, 1]
        assert torch.allclose(example["instance_mask"][0], red, atol=2 / 255)


def test_masks_train_through_the_cli_and_resume_bitwise(run_args, tmp_path, toy_subject_dir):
    folder = _photos(tmp_path, toy_subject_dir)
    _left_half_masks(folder)
    args = (
        f"--data.instance_data_dir={folder}",
        "--data.center_crop=false",  # random crops: pixels encoded each step, the mask cropped alike
        "--data.random_flip=true",
        "--data.batch_size=2",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--trainer.callbacks.init_args.save_top_k=-1",
    )
    full = cli_main(run_args(*args, *QUIET, steps=4))
    rec = _recorded(full)
    for weight, prior in zip(rec.loss_weights, rec.is_prior, strict=True):
        assert weight is not None and weight.shape[0] == prior.shape[0]
        assert torch.equal(weight[prior], torch.ones_like(weight[prior]))  # class rows: unmasked
        assert float(weight[~prior].mean()) < 0.75  # instance rows: about half the crop is masked out
    (ckpt,) = Path(full.trainer.log_dir).glob("checkpoints/*-step=3.ckpt")  # mid-epoch
    resumed = cli_main(run_args(*args, *QUIET, steps=4) + ["--ckpt_path", str(ckpt)])
    assert all(torch.equal(a, b) for a, b in zip(_recorded(resumed).loss_weights, rec.loss_weights[3:], strict=True))
    assert _max_diff(_export(resumed), _export(full)) == 0.0


def test_cached_latents_carry_the_mask_of_the_view_they_train(run_args, tmp_path, toy_subject_dir):
    folder = _photos(tmp_path, toy_subject_dir)
    masks = _left_half_masks(folder)
    cli = cli_main(run_args(f"--data.instance_data_dir={folder}", "--data.random_flip=true", *QUIET, steps=4))
    left = torch.from_numpy(next(iter(masks.values())) / 255.0).float()
    left = F.adaptive_avg_pool2d(left[None, None], (16, 16))[0, 0]  # at latent size, as the latent cache holds it
    seen = set()
    for weight, prior in zip(_recorded(cli).loss_weights, _recorded(cli).is_prior, strict=True):
        assert torch.equal(weight[prior], torch.ones_like(weight[prior]))
        for row in weight[~prior]:
            flipped = torch.equal(row[0], left.flip(-1))
            assert flipped or torch.equal(row[0], left)
            seen.add(flipped)
    assert seen == {False, True}  # both cached views, each with its own mask


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_masks_live_in_the_latent_cache_and_a_changed_mask_rebuilds_it(
    run_args, tmp_path, toy_subject_dir, monkeypatch, buckets
):
    """The latent cache holds each photo's mask at latent size (per bucket too): a cached run decodes each mask once,
    for the up-front check, and builds no mask for training; a changed mask file gives another cache entry."""
    import datamodules.bucket_dataset
    import datamodules.datasets
    import datamodules.masks

    folder = _photos(tmp_path, toy_subject_dir)
    masks = _left_half_masks(folder)
    reads: list[str] = []  # (where, photo) of each mask decoded
    for module in (datamodules.masks, datamodules.datasets, datamodules.bucket_dataset):
        real = module.load_mask

        def counting(photo, size, alpha_mask, real=real, where=module.__name__):
            reads.append(f"{where} {Path(photo).name}")
            return real(photo, size, alpha_mask)

        monkeypatch.setattr(module, "load_mask", counting)
    cache = tmp_path / "cache"
    args = (
        f"--data.instance_data_dir={folder}",
        f"--data.cache_dir={cache}",
        f"--data.buckets={str(buckets).lower()}",
        "--data.random_flip=true",
        "--data.batch_size=4",  # every photo in the one batch
        *QUIET,
    )
    cli_main(run_args(*args, steps=1))
    entries = sorted(cache.glob("latents-*.safetensors"))
    assert len(entries) == 1 and any(not r.startswith("datamodules.masks ") for r in reads)  # built from the masks

    reads.clear()
    again = cli_main(run_args(*args, steps=1))
    assert sorted(reads) == sorted(f"datamodules.masks {name}" for name in masks)  # the check, once per mask
    assert sorted(cache.glob("latents-*.safetensors")) == entries  # a hit
    (weight,), (prior,) = _recorded(again).loss_weights, _recorded(again).is_prior
    assert weight.shape[-2:] == (16, 16)  # latent size (tiny-sd: VAE factor 4)
    left = F.adaptive_avg_pool2d(torch.from_numpy(next(iter(masks.values())) / 255.0).float()[None, None], (16, 16))
    assert all(torch.equal(row, left[0]) or torch.equal(row, left[0].flip(-1)) for row in weight[~prior])

    photo = sorted(folder.glob("*.png"))[0]
    Image.new("L", Image.open(photo).size, 255).save(photo.with_name(f"{photo.stem}_mask.png"))  # now all white
    changed = cli_main(run_args(*args, steps=1))
    assert len(list(cache.glob("latents-*.safetensors"))) == 2  # another entry: the mask file is in the key
    (weight,), (prior,) = _recorded(changed).loss_weights, _recorded(changed).is_prior
    assert sum(torch.equal(row, torch.ones_like(row)) for row in weight[~prior]) == 1  # the white mask's photo


def test_no_mask_or_alpha_mask_off_trains_bitwise_as_before_and_alpha_masks_train(run_args, tmp_path, toy_subject_dir):
    plain_cli = cli_main(run_args(*QUIET, steps=3))
    assert all(w is None for w in _recorded(plain_cli).loss_weights)  # no mask: the loss as it was
    plain = _export(plain_cli)
    opaque = tmp_path / "opaque"  # the same photos as RGBA, fully opaque: the same pixels
    opaque.mkdir()
    for photo in sorted(toy_subject_dir.glob("*.png")):
        Image.open(photo).convert("RGBA").save(opaque / photo.name)
    off = cli_main(run_args(f"--data.instance_data_dir={opaque}", *QUIET, steps=3))
    assert _max_diff(_export(off), plain) == 0.0
    on = cli_main(run_args(f"--data.instance_data_dir={opaque}", "--data.alpha_mask=true", *QUIET, steps=3))
    assert all(w is not None and torch.equal(w, torch.ones_like(w)) for w in _recorded(on).loss_weights)
    assert _max_diff(_export(on), plain) < 1e-5  # all-ones masks: the same loss, up to float rounding
    half = tmp_path / "half"
    half.mkdir()
    for photo in sorted(toy_subject_dir.glob("*.png")):
        rgba = np.array(Image.open(photo).convert("RGBA"))
        rgba[:, rgba.shape[1] // 2 :, 3] = 0
        Image.fromarray(rgba, "RGBA").save(half / photo.name)
    masked = cli_main(run_args(f"--data.instance_data_dir={half}", "--data.alpha_mask=true", *QUIET, steps=3))
    rec = _recorded(masked)
    assert all(float(w[~p].mean()) == pytest.approx(0.5) for w, p in zip(rec.loss_weights, rec.is_prior, strict=True))
    assert _max_diff(_export(masked), plain) > 1e-4


def _refuse_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad mask was reported")

    monkeypatch.setattr(datamodules.caches, "load_cache", refuse)
    monkeypatch.setattr(datamodules.dreambooth, "generate_class_images", refuse)


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda m: Image.new("L", (32, 32), 255).save(m), r"_mask\.png.*32x32.*64x64"),
        (lambda m: m.write_bytes(b"\x89PNG not really"), r"_mask\.png.*cannot be read"),
        (lambda m: Image.new("L", (64, 64), 0).save(m), r"_mask\.png.*black everywhere"),
    ],
    ids=["other-size", "unreadable", "all-black"],
)
def test_bad_masks_fail_early_naming_the_file(run_args, tmp_path, toy_subject_dir, monkeypatch, write, match):
    folder = _photos(tmp_path, toy_subject_dir)
    photo = sorted(folder.glob("*.png"))[0]
    write(photo.with_name(f"{photo.stem}_mask.png"))
    _refuse_models(monkeypatch)
    with pytest.raises(InputFileError, match=match):
        cli_main(run_args(f"--data.instance_data_dir={folder}", *QUIET, steps=1))
