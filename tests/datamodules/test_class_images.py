"""Class-image generation with the built-in tiny model: exact counts, top-up, atomic files, seeds, records."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sd.models.loading as sd_loading
from datamodules.class_images import RECORD_NAME, generate_class_images
from datamodules.images import list_images

MODEL, PROMPT = "builtin:tiny-sd", "a photo of ball"


def _no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded although the folder had enough images")

    monkeypatch.setattr(sd_loading, "load_pipeline", fail)


def test_makes_n_images_then_tops_up_without_touching_existing_ones(tmp_path, monkeypatch):
    out = tmp_path / "class"
    assert generate_class_images(MODEL, PROMPT, out, 2, 64, batch_size=2, num_inference_steps=2) == 2
    first = list_images(out)
    assert [p.name for p in first] == ["class_00000.png", "class_00001.png"]
    assert all(Image.open(p).size == (64, 64) for p in first)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["class_prompt"] == PROMPT and record["pretrained_model_name_or_path"] == MODEL
    assert (record["num_inference_steps"], record["guidance_scale"], record["resolution"]) == (2, 7.5, 64)

    assert generate_class_images(MODEL, PROMPT, out, 3, 64, batch_size=2, num_inference_steps=2) == 1
    assert [p.name for p in list_images(out)] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert {p.name: p.stat().st_mtime_ns for p in first} == mtimes
    assert sorted(json.loads((out / RECORD_NAME).read_text())["images"]) == [p.name for p in list_images(out)]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in list_images(out)] + [RECORD_NAME]  # no .tmp

    _no_model(monkeypatch)
    assert generate_class_images(MODEL, PROMPT, out, 3, 64, num_inference_steps=2) == 0


def test_images_depend_on_the_seed_not_on_the_batch_size(tmp_path, class_images_dir):
    # class_images_dir: 4 images, batch_size=4, 2 steps, seed 0 (tests/conftest.py).
    same = tmp_path / "same"
    generate_class_images(MODEL, PROMPT, same, 4, 64, batch_size=4, num_inference_steps=2)
    ref = sorted(p for p in class_images_dir.glob("class_*.png"))
    assert [p.read_bytes() for p in list_images(same)] == [p.read_bytes() for p in ref]

    # Resumed with other batch sizes: the same noise per image. Batched float kernels round differently for
    # other batch shapes, so pixels may differ by one 8-bit level, in a handful of places.
    other = tmp_path / "other"
    generate_class_images(MODEL, PROMPT, other, 1, 64, batch_size=1, num_inference_steps=2)
    generate_class_images(MODEL, PROMPT, other, 4, 64, batch_size=3, num_inference_steps=2)
    assert list_images(other)[0].read_bytes() == ref[0].read_bytes()  # first row of a batch either way
    for a, b in zip(list_images(other), ref, strict=True):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    different_seed = tmp_path / "seed1"
    generate_class_images(MODEL, PROMPT, different_seed, 1, 64, num_inference_steps=2, seed=1)
    assert list_images(different_seed)[0].read_bytes() != ref[0].read_bytes()


def test_images_already_there_count_and_no_model_loads(tmp_path, monkeypatch):
    for k in range(2):
        Image.new("RGB", (80, 80), (k, k, k)).save(tmp_path / f"mine_{k}.jpg")
    _no_model(monkeypatch)
    assert generate_class_images(MODEL, PROMPT, tmp_path, 2, 64) == 0
    assert not (tmp_path / RECORD_NAME).exists()  # the user's images are not claimed as generated


def test_warns_when_the_folder_was_made_by_another_prompt_or_model(tmp_path, class_images_dir, monkeypatch, caplog):
    folder = tmp_path / "class"
    shutil.copytree(class_images_dir, folder)
    _no_model(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="datamodules.class_images"):
        generate_class_images(MODEL, PROMPT, folder, 4, 64)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="datamodules.class_images"):
        generate_class_images(MODEL, "a photo of cube", folder, 4, 64)
        generate_class_images("builtin:tiny-sd-v", PROMPT, folder, 4, 64)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "another prompt/model" in messages[0] and "'a photo of ball'" in messages[0]
    assert "builtin:tiny-sd-v" in messages[1]
    assert len(list_images(folder)) == 4  # nothing deleted


@pytest.mark.parametrize("kwargs", [{"resolution": 60}, {"batch_size": 0}, {"num_class_images": -1}])
def test_bad_arguments(tmp_path, kwargs):
    args = {"num_class_images": 1, "resolution": 64, **kwargs}
    with pytest.raises(ValueError):
        generate_class_images(MODEL, PROMPT, tmp_path, **args)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_missing_splits_without_duplicates(world_size):
    from datamodules.class_images import shard_missing

    missing = [0, 2, 3, 5, 8, 9, 10]
    shards = [shard_missing(missing, r, world_size) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == missing
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_missing(missing, world_size, world_size)


def test_ranks_make_disjoint_shares_and_rank_0_records(tmp_path, class_images_dir):
    # Each rank sees the folder as it was before anyone wrote (under DDP a barrier ensures it); here two copies.
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    for folder in folders:
        folder.mkdir()
        shutil.copy(class_images_dir / "class_00001.png", folder)
    made = [
        generate_class_images(MODEL, PROMPT, f, 4, 64, num_inference_steps=1, rank=r, world_size=2)
        for r, f in enumerate(folders)
    ]
    new = [{p.name for p in list_images(f)} - {"class_00001.png"} for f in folders]
    assert made == [2, 1] and new[0] | new[1] == {"class_00000.png", "class_00002.png", "class_00003.png"}
    assert not new[0] & new[1]
    assert (folders[0] / RECORD_NAME).is_file() and not (folders[1] / RECORD_NAME).exists()


def test_auto_batch_size_halves_on_out_of_memory(tmp_path, monkeypatch):
    import datamodules.class_images as ci

    sizes, real = [], ci._render

    def small_memory(pipe, chunk, *args, **kwargs):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(pipe, chunk, *args, **kwargs)

    monkeypatch.setattr(ci, "_render", small_memory)
    assert generate_class_images(MODEL, PROMPT, tmp_path, 5, 64, batch_size="auto", num_inference_steps=1) == 5
    assert sizes == [5, 2, 2, 1]  # 5 missing (fewer than the CPU's auto size 8): too many; then 2 at a time
    assert len(list_images(tmp_path)) == 5
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a fixed batch size is the user's choice: no retry
        generate_class_images(MODEL, PROMPT, tmp_path / "fixed", 3, 64, batch_size=3, num_inference_steps=1)
