"""fp16 mixed precision keeps trained weights in float32, so the GradScaler can unscale their gradients.

Lightning turns ``precision=16-mixed`` into bf16 on a CPU; the precision plugin given explicitly runs real float16
autocast with a GradScaler on the CPU, the same code path as ``16-mixed`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from train import cli_main

FP16_ON_CPU = (
    "--trainer.precision=null",
    "--trainer.plugins=lightning.pytorch.plugins.precision.MixedPrecision",
    "--trainer.plugins.precision=16-mixed",
    "--trainer.plugins.device=cpu",
)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_fp16_training_keeps_trained_weights_in_float32(run_args, use_lora):
    # A float16 trained weight would make the GradScaler raise "Attempting to unscale FP16 gradients".
    cli = cli_main(run_args(*FP16_ON_CPU, f"--model.use_lora={use_lora}", "--model.train_text_encoder=true", steps=2))
    assert cli.trainer.global_step == 2
    assert isinstance(cli.trainer.precision_plugin.scaler, torch.amp.GradScaler)
    params = list(cli.model.parameters())
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}
    # Frozen parts in half precision: those held now, and the VAE, loaded on demand (after training it is not held).
    frozen = [p for p in params if not p.requires_grad] + list(cli.model.frozen("vae").parameters())
    assert {p.dtype for p in frozen} == {torch.float16}


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_half_precision_refuses_to_train(run_args, monkeypatch, precision):
    """Under ``*-true`` Lightning converts the whole module to half, trained weights included: fit refuses, naming the
    ``-mixed`` setting to use, before class images are generated or a model loads."""
    import datamodules.dreambooth
    import lightning_modules.dreambooth

    def too_late(*args, **kwargs):
        raise AssertionError("the precision should have been refused before any preparation")

    monkeypatch.setattr(datamodules.dreambooth.DreamBoothDataModule, "prepare_data", too_late)
    monkeypatch.setattr(lightning_modules.dreambooth, "load_components", too_late)
    mixed = precision.replace("true", "mixed")
    with pytest.raises(ValueError, match=rf"trainer\.precision {precision}.*--trainer\.precision {mixed}"):
        cli_main(run_args(f"--trainer.precision={precision}", steps=1))
