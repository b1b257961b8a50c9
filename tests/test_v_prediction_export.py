"""A v-prediction full fine-tune exported as one file says so where AUTOMATIC1111 looks: ``model.yaml`` beside it."""

from __future__ import annotations

import logging

import yaml
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from safetensors import safe_open

from callbacks.run_dir import run_dir
from sd.export.folder import _save_single_file
from sd.models.ldm_config import ldm_config
from sd.models.loading import load_pipeline
from train import cli_main


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def test_v_prediction_full_export_writes_its_config(run_args, caplog):
    caplog.set_level(logging.WARNING)
    args = run_args("--model.pretrained_model_name_or_path=builtin:tiny-sd-v", "--model.use_lora=false", steps=1)
    cli = cli_main(args)
    out = run_dir(cli.trainer) / "export"
    config = yaml.safe_load((out / "model.yaml").read_text())
    params = config["model"]["params"]
    assert params["parameterization"] == "v"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
        checkpoint = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    # The config describes the exported architecture, read as diffusers reads original configs.
    pipe = load_pipeline(str(out / "pipeline"))
    unet = create_unet_diffusers_config_from_ldm(config, checkpoint)
    for key in (
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "down_block_types",
    ):
        assert _plain(unet[key]) == _plain(pipe.unet.config[key]), key
    vae = create_vae_diffusers_config_from_ldm(config, checkpoint)
    assert list(vae["block_out_channels"]) == list(pipe.vae.config.block_out_channels)
    assert vae["scaling_factor"] == pipe.vae.config.scaling_factor
    assert "model.yaml" in caplog.text and "ModelSamplingDiscrete" in caplog.text


def test_epsilon_export_writes_no_config(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    assert _save_single_file(pipe, tmp_path, "builtin:tiny-sd") == ["model.safetensors"]
    assert not (tmp_path / "model.yaml").exists()
    assert (
        "parameterization"
        not in ldm_config(dict(pipe.unet.config), dict(pipe.vae.config), dict(pipe.scheduler.config))["model"]["params"]
    )
