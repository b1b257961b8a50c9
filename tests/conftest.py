"""Shared fixtures: a drawn toy subject, its class images, and a way to run the CLI as a user would."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The libraries the tests import (torch, lightning, diffusers, transformers) leave some 600,000 objects that live as long
# as the session, and every full garbage collection walks them all: about 0.5 s each on a CPU of this suite's machine,
# and the code under test runs gc.collect() after each validation and each cache or class-image pass (besides Python's
# own full collections). So no collection runs while the test modules import; once they are imported, one collection,
# and the survivors are frozen (gc.freeze: left out of every later collection; they are never garbage). What the tests
# themselves make is collected as before. Training is unchanged: the collector frees memory, it computes nothing.
gc.disable()


def pytest_collection_finish(session) -> None:
    gc.collect()
    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session")
def _data_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(autouse=True)
def isolated_data_cache(_data_cache_dir, monkeypatch) -> Path:
    """Latent / text-embedding caches of this session go to a temporary folder, not the user's cache."""
    import datamodules.caches

    monkeypatch.setattr(datamodules.caches, "default_cache_dir", lambda: _data_cache_dir)
    return _data_cache_dir


@pytest.fixture(scope="session")
def toy_subject_dir(tmp_path_factory) -> Path:
    from datamodules.toy_subject import draw_toy_subject

    out = tmp_path_factory.mktemp("toy_subject")
    draw_toy_subject(out, num_images=4, resolution=64, seed=0)
    return out


@pytest.fixture(scope="session")
def class_images_dir(tmp_path_factory) -> Path:
    """Four class images made by the tiny model once per session; tests copy them."""
    from datamodules.class_images import generate_class_images

    out = tmp_path_factory.mktemp("class_ball")
    generate_class_images("builtin:tiny-sd", "a photo of ball", out, 4, 64, batch_size=4, num_inference_steps=2)
    return out


def fit_args(run_dir: Path, instance_dir: Path, class_dir: Path, *overrides: str, steps: int = 2) -> list[str]:
    """CLI arguments for a short, complete demo-style fit writing into ``run_dir``."""
    return [
        "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(run_dir),
        # CSV by default (fast); the W&B tests set the logger back to W&B (offline).
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--data.instance_data_dir", str(instance_dir),
        "--data.class_data_dir", str(class_dir),
        "--data.num_class_images", "4",
        # Validation renders with 3 sampler steps, not the config's 8: the same code (DPM++'s first- and second-order
        # updates), about a third of the UNet calls. Tests that need another count override it.
        "--model.sampling.num_inference_steps", "3",
        *overrides,
    ]  # fmt: skip


@pytest.fixture
def run_args(tmp_path, toy_subject_dir, class_images_dir):
    """CLI arguments for a short, complete demo-style fit in ``tmp_path``; tests append overrides."""
    class_dir = tmp_path / "class"
    shutil.copytree(class_images_dir, class_dir)

    def make(*overrides: str, steps: int = 2) -> list[str]:
        return fit_args(tmp_path / "runs", toy_subject_dir, class_dir, *overrides, steps=steps)

    return make


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory) -> Path:
    """The built-in tiny model as one ``.safetensors`` in the original SD layout, as shared on model sites."""
    from sd.models.loading import load_pipeline
    from sd.models.single_file import save_single_file

    return save_single_file(
        load_pipeline("builtin:tiny-sd"), tmp_path_factory.mktemp("single_file") / "tiny.safetensors"
    )


@pytest.fixture(scope="session")
def lora_export(tmp_path_factory, toy_subject_dir, class_images_dir) -> Path:
    """A LoRA run (UNet + text encoder) of 2 steps at a high learning rate, so that its adapters visibly change renders;
    no validation. Returns its run directory: ``export/`` and ``checkpoints/last.ckpt`` inside. Made once per session."""
    from callbacks.run_dir import run_dir
    from train import cli_main

    tmp = tmp_path_factory.mktemp("lora_run")
    class_dir = tmp / "class"
    shutil.copytree(class_images_dir, class_dir)
    cli = cli_main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp / "runs"),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(tmp / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0",
            "--metrics.enabled", "false",
            "--model.learning_rate", "0.05",
            "--model.text_encoder_lr", "0.05",
            "--data.instance_data_dir", str(toy_subject_dir),
            "--data.class_data_dir", str(class_dir),
            "--data.num_class_images", "4",
        ]
    )  # fmt: skip
    return run_dir(cli.trainer)
