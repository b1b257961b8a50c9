"""DreamBoothDataModule: option errors at construction, preparation, datasets and the batches it yields."""

from __future__ import annotations

import logging
import shutil

import pytest

import datamodules.dreambooth as dreambooth
from datamodules import DreamBoothDataModule
from datamodules.images import ImageLoadError
from datamodules.resumable import ResumableSampler

INSTANCE, CLASS = "a photo of sks ball", "a photo of ball"


def _dm(instance_dir, class_dir=None, **kwargs) -> DreamBoothDataModule:
    defaults = {
        "class_data_dir": str(class_dir) if class_dir else None,
        "class_prompt": CLASS,
        "with_prior_preservation": class_dir is not None,
        "num_class_images": 3,
        "resolution": 64,
        "pretrained_model_name_or_path": "builtin:tiny-sd",
        "class_images_inference_steps": 2,
    }
    return DreamBoothDataModule(str(instance_dir), INSTANCE, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"resolution": 60}, r"data\.resolution.*multiple of 8"),
        ({"resolution": 0}, r"data\.resolution"),
        ({"batch_size": 0}, r"data\.batch_size"),
        ({"num_workers": -1}, r"data\.num_workers"),
        ({"class_prompt": None}, r"data\.class_prompt"),
        ({"class_data_dir": None}, r"data\.class_data_dir"),
        ({"num_class_images": 0}, r"data\.num_class_images"),
        ({"instance_prompt": "  "}, r"data\.instance_prompt"),
    ],
)
def test_option_errors_name_the_option(tmp_path, kwargs, match):
    args = {"instance_data_dir": str(tmp_path), "instance_prompt": INSTANCE, "class_data_dir": str(tmp_path)}
    args.update({"class_prompt": CLASS, "with_prior_preservation": True, **kwargs})
    with pytest.raises(ValueError, match=match):
        DreamBoothDataModule(**args)


def test_without_prior_preservation_class_options_are_not_needed(tmp_path):
    dm = DreamBoothDataModule(str(tmp_path), INSTANCE, with_prior_preservation=False, num_class_images=0)
    assert dm.hparams.resolution == 512 and dm.hparams.with_prior_preservation is False


def test_warns_when_instance_and_class_prompt_are_the_same(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="datamodules.dreambooth"):
        DreamBoothDataModule(str(tmp_path), CLASS, class_data_dir=str(tmp_path), class_prompt=CLASS)
    assert "identifier" in caplog.text


def test_fit_batches_without_prior_preservation(toy_subject_dir):
    dm = _dm(toy_subject_dir, batch_size=3, cache_latents=False, cache_text_embeddings=False)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(dm.train_dataset) == 4 and loader.drop_last is False
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["is_prior"].tolist() == [False] * 3 and batch["prompts"] == [INSTANCE] * 3
    assert set(batch) == {"pixel_values", "prompts", "is_prior", "original_sizes", "crop_top_lefts"}


def test_fit_batches_with_prior_preservation_use_the_first_class_images(tmp_path, toy_subject_dir, class_images_dir):
    class_dir = tmp_path / "class"
    shutil.copytree(class_images_dir, class_dir)  # 4 images; 3 are asked for, so none is generated
    dm = _dm(toy_subject_dir, class_dir, batch_size=2, num_class_images=3, cache_latents=False)
    dm.prepare_data()
    dm.setup("fit")
    assert [p.name for p in dm.train_dataset.class_images] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["prompts"] == [INSTANCE, INSTANCE, CLASS, CLASS]
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_prepare_data_generates_the_missing_class_images(tmp_path, toy_subject_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(dreambooth, "generate_class_images", lambda *a, **k: calls.append((a, k)) or 0)
    monkeypatch.setattr(DreamBoothDataModule, "_build_caches", lambda self: None)  # no images were made
    dm = _dm(toy_subject_dir, tmp_path / "new" / "class", num_class_images=5, seed=7, class_images_batch_size=2)
    dm.prepare_data()
    assert (tmp_path / "new" / "class").is_dir()
    (args, kwargs) = calls[0]
    assert args == ("builtin:tiny-sd", CLASS, str(tmp_path / "new" / "class"), 5, 64)
    assert kwargs["seed"] == 7 and kwargs["batch_size"] == 2 and kwargs["num_inference_steps"] == 2


def test_prepare_data_checks_the_instance_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.instance_data_dir"):
        _dm(tmp_path / "missing").prepare_data()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match=r"data\.instance_data_dir.*bad\.png"):
        _dm(tmp_path).prepare_data()


def test_setup_names_a_corrupt_class_image_and_too_few_images(tmp_path, toy_subject_dir, class_images_dir):
    class_dir = tmp_path / "class"
    shutil.copytree(class_images_dir, class_dir)
    (class_dir / "class_00001.png").write_bytes(b"truncated")
    with pytest.raises(ImageLoadError, match=r"data\.class_data_dir.*class_00001\.png"):
        _dm(toy_subject_dir, class_dir).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"data\.class_data_dir.*fewer than data\.num_class_images=9"):
        _dm(toy_subject_dir, class_dir, num_class_images=9).setup("fit")


def test_workers_are_persistent(toy_subject_dir):
    dm = _dm(toy_subject_dir, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.shuffle
