"""Aspect-ratio buckets (data.buckets) through the CLI: the buckets, each batch from one bucket (class rows too), each
row's original size and crop in the batch, latents cached per bucket, the batch order from (seed, epoch) shared by
DDP ranks and resumed on another world size, resume bit for bit, bad settings named, and buckets off changing
nothing."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datamodules.caches
import datamodules.dreambooth
from core.errors import ConfigError
from datamodules.bucket_dataset import plan_items
from datamodules.buckets import make_buckets, nearest_bucket, photo_bucket
from datamodules.resumable import BucketBatchSampler
from datamodules.toy_subject import draw_toy_image
from tests.conftest import fit_args
from tests.helpers import RecordGeometry
from train import cli_main

QUIET = (
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--metrics.enabled=false",
    "--trainer.callbacks+=tests.helpers.RecordGeometry",
)
WIDE, TALL, SQUARE = (32, 64), (64, 32), (64, 64)  # (height, width) of the photos drawn below


def _draw(folder: Path, shapes: list[tuple[int, int]]) -> Path:
    """Toy-subject photos of the given (height, width): 64 px drawings, cropped to a band for wide / tall ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(shapes):
        image = draw_toy_image(64, random.Random(i))
        left, top = (64 - w) // 2, (64 - h) // 2
        image.crop((left, top, left + w, top + h)).save(folder / f"photo_{i}.png")
    return folder


def _export(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _recorded(cli) -> RecordGeometry:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordGeometry))


def test_buckets_have_the_area_and_the_step_and_photos_go_to_the_nearest():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and max(h / w, w / h) <= 2 for h, w in buckets)
    assert make_buckets(32, 8) == [(24, 40), (32, 32), (40, 24)]  # the toy model's: its step is 8
    assert make_buckets(32, 8, max_ratio=1.0) == [(32, 32)]
    assert nearest_bucket((1000, 2000), buckets) == (384, 640)  # 2:1 -> the widest (5:3)
    assert nearest_bucket((1000, 1100), buckets) == (512, 512)
    assert photo_bucket((200, 400), buckets, 512, 64, no_upscale=True) == (192, 384)  # its own size, rounded down
    assert photo_bucket((200, 400), buckets, 512, 64, no_upscale=False) == (384, 640)
    assert photo_bucket((40, 400), buckets, 512, 64, no_upscale=True) is None  # under one step: no bucket


def test_class_images_go_to_the_nearest_bucket_of_the_photos_or_are_borrowed():
    wide, square = (24, 40), (32, 32)
    items = plan_items([wide, wide, square], [(30, 60), (50, 50), (60, 60)])
    by_bucket = {b: [(it.instance, it.klass) for it in items if it.bucket == b] for b in (wide, square)}
    assert by_bucket == {wide: [(0, 0), (1, 0)], square: [(2, 1), (2, 2)]}  # one pass shows every image
    borrowed = plan_items([wide, wide, square], [(50, 50), (60, 60)])  # no wide class image: the wide bucket borrows
    assert [(it.instance, it.klass) for it in borrowed if it.bucket == wide] == [(0, 0), (1, 1)]


def _flat(batches):
    return [key for batch in batches for key in batch]


def test_the_batch_order_is_a_function_of_seed_and_epoch_shared_by_ranks_and_resumable_on_other_world_sizes():
    bucket_ids = [0] * 7 + [1] * 5 + [2] * 2
    data = list(range(len(bucket_ids)))
    one = BucketBatchSampler(data, bucket_ids, batch_size=3, seed=5)
    epoch = one.order(epoch=1)
    assert all(len({bucket_ids[i] for i, _ in batch}) == 1 for batch in epoch)  # every batch from one bucket
    assert sorted(i for i, _ in _flat(epoch)) == data and len(epoch) == len(one) == 3 + 2 + 1
    assert epoch == BucketBatchSampler(data, bucket_ids, batch_size=3, seed=5).order(epoch=1)  # f(seed, epoch)
    assert [i for i, _ in _flat(epoch)] != [i for i, _ in _flat(one.order(epoch=2))]
    # two ranks: disjoint batches, which together are the epoch's (6 batches: no padding)
    ranks = [BucketBatchSampler(data, bucket_ids, 3, seed=5, num_replicas=2, rank=r).order(1) for r in (0, 1)]
    assert ranks[0] == epoch[0::2] and ranks[1] == epoch[1::2]
    # resume: two ranks did one batch each; the rest of the epoch goes to three ranks, each item once, same seeds
    two = BucketBatchSampler(data, bucket_ids, 3, seed=5, num_replicas=2)
    done, complete = two.progress(epoch=1, start=0, batches_done=1)
    assert not complete and done == len(epoch[0]) + len(epoch[1])
    rest = [BucketBatchSampler(data, bucket_ids, 3, seed=5, num_replicas=3, rank=r).order(1, done) for r in range(3)]
    resumed = [b for k in range(2) for r in range(3) for b in rest[r][k : k + 1]]
    assert sorted(_flat(resumed[:4])) == sorted(_flat(epoch[2:]))  # 4 batches left on 3 ranks: 2 of padding
    assert two.progress(epoch=1, start=0, batches_done=3) == (len(data), True)


@pytest.fixture(scope="module")
def bucket_fit(tmp_path_factory, class_images_dir):
    """One fit on wide, tall and square photos with buckets (cached latents, flips): the batches it trained on."""
    tmp = tmp_path_factory.mktemp("buckets")
    photos = _draw(tmp / "photos", [WIDE, WIDE, TALL, SQUARE])
    shutil.copytree(class_images_dir, tmp / "class")
    options = ("--data.buckets=true", "--data.random_flip=true", f"--data.cache_dir={tmp / 'cache'}")
    return cli_main(fit_args(tmp / "runs", photos, tmp / "class", *QUIET, *options, steps=6))


def test_every_batch_is_one_bucket_and_carries_each_rows_size_and_crop(bucket_fit):
    rec = _recorded(bucket_fit)
    data = bucket_fit.datamodule.train_dataset
    assert data.dataset.buckets == [(48, 80), (64, 64), (80, 48)]  # tiny-sd: step 8 (VAE 2 x UNet 4)
    shapes = {s[2:] for s in rec.shapes}
    assert len(shapes) == 3 and all(s[0] * 80 == s[1] * 48 or s[0] == s[1] or s[0] * 48 == s[1] * 80 for s in shapes)
    rows = 0
    for shape, sizes, crops, prior in zip(
        rec.shapes, rec.original_sizes, rec.crop_top_lefts, rec.is_prior, strict=True
    ):
        assert sizes.dtype == crops.dtype == torch.long and sizes.shape == crops.shape == (shape[0], 2)
        assert torch.equal(sizes[prior], torch.tensor([SQUARE] * int(prior.sum())))  # class images: 64 x 64 as made
        for size, crop in zip(sizes[~prior].tolist(), crops[~prior].tolist(), strict=True):
            rows += 1
            # a wide photo 32 x 64 covers 48 x 80 at 48 x 96: the center crop starts 8 px in (flipped: 96 - 8 - 80 = 8)
            expected = {WIDE: [0, 8], TALL: [8, 0], SQUARE: [0, 0]}[tuple(size)]
            assert crop == expected
        assert prior.any() and (~prior).any()  # instance and class rows in one batch, of one size
    assert rows >= 6


def test_latents_are_cached_per_bucket(bucket_fit):
    cache = Path(bucket_fit.datamodule.hparams.cache_dir)
    buckets = [json.loads(p.read_text()).get("bucket") for p in cache.rglob("*.json")]
    assert sorted(b for b in buckets if b) == [[48, 80], [64, 64], [80, 48]]  # one latent cache per bucket


def test_buckets_resume_bitwise_with_random_crops(run_args, tmp_path):
    photos = _draw(tmp_path / "photos", [WIDE, TALL, SQUARE, WIDE])
    args = (
        f"--data.instance_data_dir={photos}",
        "--data.buckets=true",
        "--data.center_crop=false",
        "--data.random_flip=true",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--trainer.callbacks.init_args.save_top_k=-1",
    )
    full = cli_main(run_args(*args, *QUIET, steps=4))
    (ckpt,) = Path(full.trainer.log_dir).glob("checkpoints/*-step=2.ckpt")  # mid-epoch (3 batches an epoch)
    resumed = cli_main(run_args(*args, *QUIET, steps=4) + ["--ckpt_path", str(ckpt)])
    assert _same(_export(resumed), _export(full))
    a, b = _recorded(full), _recorded(resumed)
    assert all(torch.equal(x, y) for x, y in zip(a.crop_top_lefts[2:], b.crop_top_lefts, strict=True))
    centered = {(0, 8), (8, 0), (0, 0)}
    rows = [tuple(r) for c, p in zip(a.crop_top_lefts, a.is_prior, strict=True) for r in c[~p].tolist()]
    assert any(r not in centered for r in rows)  # random crops


def test_buckets_off_train_bitwise_as_before(run_args):
    """The bucket options without data.buckets change nothing: the same weights bit for bit, square geometry."""
    plain = cli_main(run_args(*QUIET, steps=3))
    off = (
        "--data.buckets=false",
        "--data.bucket_step=16",
        "--data.bucket_max_ratio=3",
        "--data.bucket_no_upscale=true",
    )
    other = cli_main(run_args(*QUIET, *off, steps=3))
    assert _same(_export(other), _export(plain))
    # Every batch says where its rows came from (SDXL reads it): here the 64 px photos, uncropped.
    assert all(bool((sizes == 64).all()) for sizes in _recorded(plain).original_sizes)
    assert all(not bool(crops.any()) for crops in _recorded(plain).crop_top_lefts)


def _refuse_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad setting was reported")

    monkeypatch.setattr(datamodules.caches, "load_cache", refuse)
    monkeypatch.setattr(datamodules.dreambooth, "generate_class_images", refuse)


@pytest.mark.parametrize(
    "options, match",
    [
        (["--data.bucket_max_ratio=0.5"], "data.bucket_max_ratio"),
        (["--data.bucket_step=12"], "data.bucket_step"),
        (["--data.bucket_step=4"], "data.bucket_step=4 is not a multiple of 8"),
        (["--data.bucket_no_upscale=true"], "photo_1.png.*no bucket.*data.bucket_no_upscale"),
    ],
    ids=["ratio", "not-a-divisor", "not-the-models-step", "photo-without-bucket"],
)
def test_bad_bucket_settings_fail_early_naming_the_option(run_args, tmp_path, monkeypatch, options, match):
    photos = _draw(tmp_path / "photos", [SQUARE, (4, 64)])  # a 64 x 4 strip: under one step high
    _refuse_models(monkeypatch)
    with pytest.raises(ConfigError, match=match):
        cli_main(run_args(*QUIET, f"--data.instance_data_dir={photos}", "--data.buckets=true", *options, steps=1))


class RecordBatchKeys(RecordGeometry):
    """Prints each training batch's rank, shape and original sizes (read from a subprocess's output)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        image = batch["latent_mean" if "latent_mean" in batch else "pixel_values"]
        print(f"BATCH rank={trainer.global_rank} shape={tuple(image.shape)} sizes={batch['original_sizes'].tolist()}")


@pytest.mark.slow
def test_two_process_ddp_fit_with_buckets(run_args, tmp_path):
    """Two ranks (gloo): Lightning keeps the bucket sampler (no sampler of its own), each rank takes whole batches of
    one bucket, and the ranks' batches differ."""
    import subprocess
    import sys

    photos = _draw(tmp_path / "photos", [WIDE, WIDE, TALL, SQUARE])
    args = run_args(
        f"--data.instance_data_dir={photos}", "--data.buckets=true", "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0", "--metrics.enabled=false",
        "--trainer.callbacks+=tests.test_buckets_cli.RecordBatchKeys", steps=2,
    )  # fmt: skip
    cmd = [sys.executable, "train.py", *args, "--trainer.strategy=ddp", "--trainer.devices=2"]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    batches = re.findall(r"BATCH rank=(\d) shape=(\([^)]*\))", result.stdout)  # the ranks' lines may interleave
    assert len(batches) == 4 and {rank for rank, _ in batches} == {"0", "1"}
    assert [b for b in batches if b[0] == "0"] != [b for b in batches if b[0] == "1"]
