"""Shared fixtures: a drawn toy subject, its class images, and a way to run the CLI as a user would."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture
def run_args(tmp_path, toy_subject_dir, class_images_dir):
    """CLI arguments for a short, complete demo-style fit in ``tmp_path``; tests append overrides."""
    class_dir = tmp_path / "class"
    shutil.copytree(class_images_dir, class_dir)

    def make(*overrides: str, steps: int = 2) -> list[str]:
        return [
            "fit",
            "--config", str(ROOT / "configs" / "demo.yaml"),
            "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--data.instance_data_dir", str(toy_subject_dir),
            "--data.class_data_dir", str(class_dir),
            "--data.num_class_images", "4",
            *overrides,
        ]  # fmt: skip

    return make
