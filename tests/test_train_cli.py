"""End-to-end: ``train.py fit`` on the tiny model, as a user runs it, and what it leaves behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from callbacks.fault_tolerance import SafeCheckpointIO
from callbacks.run_dir import run_dir
from sd.models.builtin import resolve_pretrained
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _render(pipe: StableDiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of sks ball", num_inference_steps=2, generator=g, output_type="np").images


def _changed(model: torch.nn.Module, base: torch.nn.Module) -> bool:
    base_sd = base.state_dict()
    return any(not torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def _base_pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(resolve_pretrained("builtin:tiny-sd"), safety_checker=None)


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+te"])
def test_fit_lora_exports_a_file_diffusers_loads(run_args, train_text_encoder):
    cli = cli_main(run_args(f"--model.train_text_encoder={train_text_encoder}", steps=3))
    assert cli.trainer.global_step == 3
    export = run_dir(cli.trainer) / "export"
    weights = load_file(export / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in k for k in weights)
    assert any(k.startswith("unet.") for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights) == train_text_encoder
    assert (run_dir(cli.trainer) / "config.yaml").is_file()
    # Trained on cached latents (and text embeddings when the text encoder is frozen): those were never loaded.
    assert cli.model.vae is None and (cli.model.text_encoder is None) == (not train_text_encoder)

    base = _render(_base_pipe())
    pipe = _base_pipe()
    pipe.load_lora_weights(export)
    tuned = _render(pipe)
    assert np.abs(tuned - base).max() > 1e-4, "the exported LoRA changes nothing"


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+te"])
def test_fit_full_exports_a_pipeline_folder(run_args, train_text_encoder):
    cli = cli_main(run_args("--model.use_lora=false", f"--model.train_text_encoder={train_text_encoder}"))
    folder = run_dir(cli.trainer) / "export" / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    base = _base_pipe()
    assert _changed(pipe.unet, base.unet)
    assert _changed(pipe.text_encoder, base.text_encoder) == train_text_encoder
    assert _render(pipe).shape == (1, 64, 64, 3)


def test_lora_checkpoint_holds_only_trained_weights_and_resumes(run_args, tmp_path):
    args = run_args("--trainer.callbacks.init_args.every_n_train_steps=2", "--model.train_text_encoder=true", steps=2)
    cli = cli_main(args)
    (ckpt_path,) = run_dir(cli.trainer).rglob("last.ckpt")
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)  # atomic writes, weights_only loads
    names = sorted(p.name for p in ckpt_path.parent.iterdir())  # no temporary file left beside them
    assert {"epoch=0-step=2.ckpt", "last.ckpt"} <= set(names) and all(n.endswith(".ckpt") for n in names)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), "a frozen base weight entered the checkpoint"
    trainable = {n: p for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(keys) == set(trainable)
    # The file is the trained weights plus AdamW's two moments, plus small overhead.
    n_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    assert 3 * n_bytes <= ckpt_path.stat().st_size <= 3 * n_bytes + 2_000_000
    saved_step = float(ckpt["optimizer_states"][0]["state"][0]["step"])

    resumed = cli_main(
        run_args("--model.train_text_encoder=true", "--trainer.callbacks+=tests.helpers.RecordStart", steps=4)
        + ["--ckpt_path", str(ckpt_path)]
    )
    record = next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "RecordStart")
    assert record.global_step == 2
    assert record.optimizer_step == saved_step
    assert resumed.trainer.global_step == 4


def test_loss_is_logged(run_args):
    cli = cli_main(run_args("--trainer.log_every_n_steps=1", steps=2))
    metrics = (run_dir(cli.trainer) / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/loss_instance", "train/loss_prior", "train/lr_unet", "train/lr_text_encoder"):
        assert name in metrics


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses_offline(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "pretrained_model_name_or_path" in printed and "instance_prompt" in printed


def test_train_py_runs_as_a_script(run_args):
    """The user's own command line, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "train.py", *run_args(steps=1)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exported trained weights to" in result.stdout + result.stderr
    # The project's INFO messages show on the command line (core.console), here the latent cache's; Python alone
    # would show warnings only. The libraries' warnings that do not apply to a run, and Lightning's advert, do not.
    cache = r"(Building the latent cache: encoding|Latent cache hit:) \d+ images at 64x64"
    assert re.search(cache, result.stderr), result.stderr[-3000:]
    for noise in ("in eval mode at the start of training", "smaller than the logging interval", "LeafSpec", "Tip:"):
        assert noise not in result.stderr + result.stdout, noise


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "strategies").glob("*.yaml")), ids=lambda p: p.name)
def test_strategy_overlays_compose_with_the_full_configs(overlay, capsys):
    base = "sd15_lora.yaml" if "lora" in overlay.read_text() or "ddp" in overlay.name else "sd15_dreambooth.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / base), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "strategy" in capsys.readouterr().out


def test_fused_backward_full_fine_tuning_trains_and_resumes(run_args):
    args = run_args("--model.use_lora=false", "--model.fused_backward=true", "--model.optimizer=adamw8bit", steps=2)
    cli = cli_main([*args, "--trainer.callbacks.init_args.every_n_train_steps=2"])
    assert cli.trainer.global_step == 2
    (ckpt,) = Path(run_dir(cli.trainer)).rglob("last.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert len(saved["state"]) == sum(p.requires_grad for p in cli.model.parameters())
    resumed = cli_main(
        run_args("--model.use_lora=false", "--model.fused_backward=true", "--model.optimizer=adamw8bit", steps=3)
        + ["--trainer.callbacks+=tests.helpers.RecordStart", "--ckpt_path", str(ckpt)]
    )
    record = next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "RecordStart")
    assert record.global_step == 2 and record.optimizer_step == float(saved["state"][0]["step"]) == 2
    assert resumed.trainer.global_step == 3


def test_fused_backward_refuses_gradient_clipping(run_args):
    with pytest.raises(ValueError, match="fused_backward cannot be combined with: trainer.gradient_clip_val"):
        cli_main(run_args("--model.use_lora=false", "--model.fused_backward=true", "--trainer.gradient_clip_val=1.0"))
