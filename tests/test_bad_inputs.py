"""Bad input fails early through the CLI, with a message naming the problem, before any model loads."""

from __future__ import annotations

import shutil

import pytest

import lightning_modules.dreambooth
import sd.models.loading
from core.errors import UserInputError
from train import cli_main


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load in these tests is a failure: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(lightning_modules.dreambooth, "load_components", refuse)
    monkeypatch.setattr(sd.models.loading, "load_pipeline", refuse)


def _fit(run_args, *overrides):
    try:
        cli_main(run_args(*overrides, steps=1))
    except (ValueError, OSError) as e:  # what these tests expect; the command line prints it without a traceback
        assert isinstance(e, UserInputError), f"{type(e).__name__} is no UserInputError: {e}"
        raise


def test_missing_instance_folder(run_args, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.instance_data_dir.*nope"):
        _fit(run_args, f"--data.instance_data_dir={tmp_path / 'nope'}")


def test_empty_instance_folder(run_args, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data\.instance_data_dir.*no image"):
        _fit(run_args, f"--data.instance_data_dir={tmp_path / 'empty'}")


def test_folder_with_no_readable_image(run_args, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(ValueError, match="no image"):
        _fit(run_args, f"--data.instance_data_dir={folder}")


def test_corrupt_image_is_named(run_args, tmp_path, toy_subject_dir):
    folder = tmp_path / "photos"
    shutil.copytree(toy_subject_dir, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        _fit(run_args, f"--data.instance_data_dir={folder}")


def test_prior_preservation_without_class_prompt(run_args):
    with pytest.raises(ValueError, match=r"data\.class_prompt"):
        _fit(run_args, "--data.class_prompt=null")


def test_resolution_not_divisible_by_8(run_args):
    with pytest.raises(ValueError, match=r"data\.resolution"):
        _fit(run_args, "--data.resolution=60")


def test_lora_rank_must_be_positive(run_args):
    with pytest.raises(ValueError, match=r"model\.lora_rank"):
        _fit(run_args, "--model.lora_rank=0")


def test_unknown_optimizer_is_refused_at_parse_time(run_args):
    with pytest.raises(SystemExit):
        _fit(run_args, "--model.optimizer=sgd")


def test_base_model_path_that_does_not_exist(run_args, tmp_path, monkeypatch):
    monkeypatch.undo()  # here the model loading itself must give the clear error
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_model_name_or_path"):
        _fit(run_args, f"--model.pretrained_model_name_or_path={tmp_path / 'no_model'}", "--data.num_class_images=4")
