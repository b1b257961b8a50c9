"""data.holdout through the CLI on the tiny model: val/loss logged at each validation on photos kept out of training,
dropping over a short fit; the fixed inputs are the same every time; with too few photos it runs on the training
photos and training is bit for bit what it is without it."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
import torch

from callbacks.run_dir import run_dir
from sd.models.loading import load_components, load_parts
from sd.training.heldout import HeldOutSet, fixed_timesteps, heldout_inputs, heldout_loss, split_holdout
from tests.conftest import fit_args
from train import cli_main, main

# One subject prompt, one image, two sampler steps: the renders are not what is tested here.
QUICK_VALIDATION = (
    '--data.validation_prompts=["a {identifier} {class_noun}"]',
    "--data.pres_prompt=null",
    "--model.sampling.num_images_per_prompt=1",
    "--model.sampling.num_inference_steps=2",
)


def _val_losses(cli) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv"))
    return [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]


@pytest.fixture(scope="module")
def heldout_fit(tmp_path_factory, toy_subject_dir, class_images_dir):
    """12 steps holding one of the four photos out, validating every 4 steps."""
    root = tmp_path_factory.mktemp("heldout")
    shutil.copytree(class_images_dir, root / "class")
    args = ("--data.holdout=1", "--trainer.val_check_interval=4", *QUICK_VALIDATION)
    return cli_main(fit_args(root / "runs", toy_subject_dir, root / "class", *args, steps=12))


def test_val_loss_is_logged_at_each_validation_and_drops(heldout_fit, toy_subject_dir):
    losses = _val_losses(heldout_fit)
    assert [step for step, _ in losses] == [0, 4, 8, 12]  # the base model, then every validation of fit
    values = [v for _, v in losses]
    assert values[-1] < values[0], f"val/loss did not drop over the fit: {values}"
    # The photo held out (the last by name) is not trained on.
    photos = sorted(p.name for p in toy_subject_dir.iterdir())
    trained = [
        p.name for p in heldout_fit.datamodule._build_train_dataset(heldout_fit.datamodule.concepts[0]).instance_images
    ]
    assert trained == photos[:-1] and heldout_fit.datamodule.heldout.pixels.shape[0] == 1
    assert not heldout_fit.datamodule.heldout.on_training_photos


def test_the_fixed_inputs_are_the_same_every_time():
    """Two builds of the inputs are equal, and the loss of one model on them is the same twice."""
    parts = load_components("builtin:tiny-sd", None, None, None, with_vae=False, with_text_encoder=True)
    vae = load_parts("builtin:tiny-sd", ["vae"], None, None, None)["vae"]
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    held = HeldOutSet(pixels, ["a sks ball", "a sks ball on grass"], False)
    a, b = (heldout_inputs(vae, parts.noise_scheduler, held, seed=0) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a.prompts == b.prompts
    assert a.timesteps.tolist() == [125, 375, 625, 875] * 2 == fixed_timesteps(1000).tolist() * 2
    from sd.training.diffusion import encode_text, tokenize

    def denoise(noisy, t, prompts):
        return parts.unet(noisy, t, encode_text(parts.text_encoder, tokenize(parts.tokenizer, prompts))).sample

    assert torch.equal(heldout_loss(denoise, parts.noise_scheduler, a), heldout_loss(denoise, parts.noise_scheduler, b))


def test_split_holdout():
    assert split_holdout(list("abcde"), 2) == (list("abc"), list("de"), False)
    assert split_holdout(list("abcd"), 2) == (list("abcd"), list("abcd"), True)  # 2 left: too few to hold out
    assert split_holdout(list("abcd"), 0) == (list("abcd"), [], False)


def test_with_too_few_photos_it_measures_the_training_photos_and_training_is_unchanged(run_args, caplog):
    """data.holdout 2 of 4 photos would leave 2: none is held out; the loss runs on the training photos, and the
    trained weights are bit for bit those of a run without data.holdout (the loss draws no global random number)."""
    every_2 = (
        "--trainer.val_check_interval=2",
        "--trainer.callbacks.init_args.every_n_train_steps=4",
        *QUICK_VALIDATION,
    )
    plain = cli_main(run_args(*every_2, steps=4))
    with caplog.at_level(logging.WARNING):
        measured = cli_main(run_args(*every_2, "--data.holdout=0.5", steps=4))
    assert "val/loss is measured on the training photos" in caplog.text
    assert measured.datamodule.heldout.on_training_photos and measured.datamodule.heldout.pixels.shape[0] == 4
    assert [step for step, _ in _val_losses(measured)] == [0, 2, 4] and not _val_losses(plain)
    ckpts = [torch.load(next(run_dir(c.trainer).rglob("last.ckpt")), weights_only=True) for c in (plain, measured)]
    a, b = (c["state_dict"] for c in ckpts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "1.5", "-2"])
def test_a_bad_holdout_is_a_clean_error(run_args, capsys, value):
    assert main(run_args(f"--data.holdout={value}")) == 2
    assert "data.holdout must be a number of photos" in capsys.readouterr().err
