"""The 2-process DDP fit (gloo, CPU) of the other families, as a user launches it: SDXL (``builtin:tiny-sdxl``) and
SD 2.x (``builtin:tiny-sd2``, v-prediction), LoRA on the UNet and the text encoder(s). Class images are made once by
the family's pipeline, the ranks end with the same weights (the gradients were averaged: each rank trained on other
photos), the weights moved, and rank 0 alone exports. One optimizer step each (``tests/test_ddp.py``: SD 1.x)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("model", "text_encoder_keys"),
    [("builtin:tiny-sdxl", ("text_encoder.", "text_encoder_2.")), ("builtin:tiny-sd2", ("text_encoder.",))],
)
def test_two_process_ddp_fit(model, text_encoder_keys, tmp_path, toy_subject_dir):
    weights = tmp_path / "weights"
    weights.mkdir()
    class_dir = tmp_path / "class"  # empty: the class images are generated here, by the family's pipeline
    args = fit_args(
        tmp_path / "runs", toy_subject_dir, class_dir,
        f"--model.pretrained_model_name_or_path={model}",
        "--data.num_class_images=2", "--data.class_images_inference_steps=2",
        "--model.lr_warmup_steps=0", "--model.learning_rate=0.01", "--model.text_encoder_lr=0.01",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks+=tests.helpers.SaveTrainedWeights",
        steps=1,
    )  # fmt: skip
    cmd = [sys.executable, "train.py", *args, "--trainer.strategy=ddp", "--trainer.devices=2"]
    env = {**os.environ, "SAVE_WEIGHTS_DIR": str(weights)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class_00000.png", "class_00001.png"]
    start = [torch.load(weights / f"start_rank{r}.pt") for r in (0, 1)]
    end = [torch.load(weights / f"end_rank{r}.pt") for r in (0, 1)]
    assert start[0].keys() == end[1].keys() and any(k.startswith("text_encoder") for k in start[0])
    for name in start[0]:
        assert torch.equal(start[0][name], start[1][name]), f"the ranks start apart: {name}"
        assert torch.equal(end[0][name], end[1][name]), f"the ranks end apart (gradients not averaged?): {name}"
    moved = [name for name in start[0] if not torch.equal(start[0][name], end[0][name])]
    assert {n.split(".")[0] for n in moved} == {"unet", *(k.rstrip(".") for k in text_encoder_keys)}

    # Rank 0 alone exported, once, into the one run folder; the file holds each text encoder's adapters.
    output = result.stdout + result.stderr
    assert output.count("Exported trained weights to") == 1
    (version,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    exported = load_file(version / "export" / "pytorch_lora_weights.safetensors")
    assert all(any(k.startswith(prefix) for k in exported) for prefix in ("unet.", *text_encoder_keys))
