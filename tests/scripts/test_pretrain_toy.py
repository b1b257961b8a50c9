"""scripts/pretrain_toy.py's phases: a later phase continues an earlier run only with the settings that made it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from scripts.pretrain_toy import Recipe, main, phase_of


def test_each_setting_belongs_to_its_phase():
    assert [
        phase_of(f) for f in ("vae_steps", "vae_free_fraction", "unet_lr", "text_encoder_lr", "caption_dropout")
    ] == [
        "vae",
        "vae",
        "unet",
        "unet",
        "unet",
    ]
    assert [phase_of(f) for f in ("clip_batch", "dino_temperature", "num_images", "pattern_prob", "world")] == [
        "clip",
        "dino",
        None,
        None,
        None,
    ]


def test_a_later_phase_needs_the_earlier_run_and_its_settings(tmp_path, capsys):
    with pytest.raises(SystemExit, match="recipe.json is missing"):
        main(["--out", str(tmp_path), "--phases", "unet"])
    recipe = asdict(Recipe())
    recipe["vae_steps"] += 1  # the VAE in the folder was made with other settings than the run asks for
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": recipe}))
    with pytest.raises(SystemExit, match="other vae_steps"):
        main(["--out", str(tmp_path), "--phases", "unet", "clip", "dino"])
    with pytest.raises(SystemExit, match="--set 'unet_stepz=3'"):
        main(["--out", str(tmp_path), "--phases", "vae", "--set", "unet_stepz=3"])
