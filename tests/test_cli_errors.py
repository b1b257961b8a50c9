"""User-input errors print as one ``error: <message>`` block with exit status 2 and no traceback (``--debug`` or
``DREAMBOOTH_DEBUG=1`` adds it); any other exception keeps its traceback. Policy: docs/bad_inputs.md."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import pytest

import datamodules.dreambooth
from core.errors import (
    DEBUG_ENV,
    CheckpointMismatchError,
    ConfigError,
    InputFileError,
    InputNotFoundError,
    MissingPackageError,
    UserInputError,
    format_user_error,
    report_user_errors,
)
from core.safe_files import UnsafeCheckpointError
from datamodules.images import ImageLoadError, ImageTooLargeError, list_images
from scripts import scale_sweep
from tests.conftest import ROOT, fit_args
from train import main

HINT = "(run with --debug for the traceback)"


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def _args(tmp_path, *overrides: str) -> list[str]:
    """A fit whose photo folder (``tmp_path/photos``) does not exist; nothing loads a model before that is reported."""
    return fit_args(tmp_path / "runs", tmp_path / "photos", tmp_path / "class", *overrides, steps=1)


def test_missing_photo_folder_prints_one_error_and_exits_with_status_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    result = subprocess.run(
        [sys.executable, "train.py", *_args(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr[result.stderr.index("error: ") :].rstrip()
    folder = str(tmp_path / "photos")
    assert error == (
        f"error: data.instance_data_dir: the folder {folder!r} does not exist. Point it at a folder of images.\n{HINT}"
    )


@pytest.mark.parametrize("bad", ["missing folder", "empty caption"])
def test_bad_input_fails_before_a_wandb_run_starts(tmp_path, toy_subject_dir, capsys, bad):
    # The W&B logger of configs/tiny.yaml (offline): a mistyped path or a bad caption must not leave a run behind, nor
    # an online run in the user's project.
    photos = tmp_path / "photos"
    if bad == "empty caption":
        shutil.copytree(toy_subject_dir, photos)
        (photos / f"{list_images(photos)[0].stem}.txt").write_text("  \n", encoding="utf-8")
    args = fit_args(tmp_path / "runs", photos, tmp_path / "class", steps=1)
    logger = args.index("--trainer.logger=lightning.pytorch.loggers.CSVLogger")
    args[logger : logger + 3] = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # tiny.yaml's W&B
    assert main(args) == 2
    assert str(photos) in capsys.readouterr().err
    assert not (tmp_path / "runs" / "wandb").exists()


@pytest.mark.parametrize("how", ["--debug", DEBUG_ENV])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch, how):
    args = _args(tmp_path)
    if how == "--debug":
        args.insert(1, "--debug")  # anywhere on the command line; taken out before LightningCLI parses it
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "InputNotFoundError: data.instance_data_dir" in err and HINT not in err


def test_incompatible_settings_are_a_user_error(tmp_path, capsys):
    assert main(_args(tmp_path, "--model.fused_backward=true")) == 2  # configs/tiny.yaml trains LoRA
    err = capsys.readouterr().err
    assert "error: model.fused_backward is for full fine-tuning (model.use_lora false)" in err
    assert "Traceback" not in err and err.rstrip().endswith(HINT)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(self, stage):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(datamodules.dreambooth.DreamBoothDataModule, "check_inputs", broken)  # the first data step
    with pytest.raises(RuntimeError, match="internal invariant"):  # not caught: Python prints it, status 1
        main(_args(tmp_path))


def test_scripts_report_user_errors_the_same_way(tmp_path, capsys):
    argv = ["--base", "builtin:tiny-sd", "--instance-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    assert report_user_errors(scale_sweep.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --instance-dir: the folder {str(tmp_path / 'nope')!r} does not exist.")


@pytest.mark.parametrize(
    "error, builtin",
    [
        (ConfigError, ValueError),
        (InputFileError, ValueError),
        (InputNotFoundError, FileNotFoundError),
        (CheckpointMismatchError, RuntimeError),
        (MissingPackageError, ImportError),
        (ImageLoadError, ValueError),
        (ImageTooLargeError, ValueError),
        (UnsafeCheckpointError, pickle.UnpicklingError),
    ],
)
def test_user_errors_are_still_the_builtin_type_callers_catch(error, builtin):
    assert issubclass(error, UserInputError) and issubclass(error, builtin)
    assert str(error("data.x: the message")) == "data.x: the message"


def _raised(error: Exception, cause: Exception) -> Exception:
    try:
        raise error from cause
    except Exception as e:
        return e


def test_format_indents_continuation_lines_and_adds_a_cause_the_message_does_not_quote():
    err = _raised(InputFileError("data.x: cannot read 'a.png'.\nRemove or replace it."), OSError("quota exceeded"))
    assert format_user_error(err).splitlines() == [
        "error: data.x: cannot read 'a.png'.",
        "       Remove or replace it.",
        "       caused by OSError: quota exceeded",
        HINT,
    ]
    quoted = _raised(InputFileError("data.x: 'a.png' is no image (OSError: truncated)."), OSError("truncated"))
    assert format_user_error(quoted, hint=False) == "error: data.x: 'a.png' is no image (OSError: truncated)."
