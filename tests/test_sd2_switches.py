"""The switches on SD 2.x (``builtin:tiny-sd2``: OpenCLIP-style text encoder, v-prediction) through the CLI, each
adapter in one short fit with the data and loss switches on together: DoRA / LoHa / LoKr on the UNet and the text
encoder, their kohya / LyCORIS files applied as ComfyUI applies them (SD 2.x's names are SD 1.x's: ``lora_unet_``,
``lora_te_``); the held-out val/loss; aspect-ratio buckets; captions with masks; pivotal tuning (``emb_params``);
EMA with min-SNR (its v-prediction form), offset noise and input perturbation."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from datamodules.toy_subject import draw_toy_subject
from sd.adapters.new_tokens import EMBEDDINGS_NAME
from sd.export.layout import KOHYA_WEIGHT_NAME
from tests.conftest import fit_args
from tests.test_adapters_cli import _check_file_against_layers
from train import cli_main

SWITCHES = (
    "--model.pretrained_model_name_or_path=builtin:tiny-sd2",
    "--model.learning_rate=0.05",
    "--model.text_encoder_lr=0.05",
    "--data.with_prior_preservation=false",
    "--data.holdout=1",
    "--data.buckets=true",
    "--data.new_tokens=[<s0>, <s1>]",
    "--model.new_token_init=ball",
    "--model.ema_decay=0.9",
    "--model.snr_gamma=5",
    "--model.noise_offset=0.05",
    "--model.input_perturbation=0.1",
    "--trainer.val_check_interval=2",
    "--trainer.num_sanity_val_steps=-1",
    '--data.validation_prompts=["a photo of {identifier} {class_noun}"]',
    "--model.sampling.num_images_per_prompt=1",
    "--model.sampling.num_inference_steps=2",
)
ADAPTERS = {
    "dora": ("--model.adapter=dora", "--model.lora_alpha=2"),
    "loha": ("--model.adapter=loha", "--model.lora_rank=4", "--model.lora_alpha=2"),
    "lokr": ("--model.adapter=lokr", "--model.lora_rank=2", "--model.lora_alpha=3"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six toy photos, two of them wide (another bucket), each with a caption and a half mask."""
    folder = tmp_path_factory.mktemp("sd2_photos")
    for k, path in enumerate(draw_toy_subject(folder, num_images=6, resolution=64, seed=0)):
        if k < 2:
            Image.open(path).resize((96, 64)).save(path)
        width, height = Image.open(path).size
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (0, 0, width // 2, height))
        mask.save(path.with_name(f"{path.stem}_mask.png"))
        path.with_suffix(".txt").write_text(f"a photo of {{identifier}} {{class_noun}}, photo {k}", encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=list(ADAPTERS))
def fitted(request, tmp_path_factory, photos):
    tmp = tmp_path_factory.mktemp(f"sd2_{request.param}")
    args = fit_args(tmp / "runs", photos, tmp / "class", *SWITCHES, *ADAPTERS[request.param], steps=4)
    return request.param, cli_main(args)


def test_adapter_files_apply_as_comfyui_applies_them(fitted):
    adapter, cli = fitted
    file = load_file(run_dir(cli.trainer) / "export" / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in file)
    with cli.model.averaged_weights():  # the export holds the EMA
        assert _check_file_against_layers(file, cli.model.unet, cli.model.text_encoder) > 0
    if adapter == "dora":
        assert any(k.endswith(".dora_scale") for k in file)


def test_the_data_and_loss_switches_all_ran(fitted):
    _, cli = fitted
    folder = run_dir(cli.trainer)
    with open(folder / "metrics.csv") as f:
        losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)  # step 0 and after training
    embeddings = load_file(folder / "export" / EMBEDDINGS_NAME)
    assert list(embeddings) == ["emb_params"] and embeddings["emb_params"].shape[0] == 2
    data = cli.datamodule
    assert len(set(data.train_dataset.bucket_ids)) == 2  # the wide photos in a bucket of their own
    assert len(data.train_dataset.dataset.dataset.instance_images) == 5  # one photo held out (latents of buckets)
    assert cli.model.ema is not None and cli.model.ema.num_updates == 4
    assert torch.isfinite(
        torch.stack([p.detach().float().sum() for p in cli.model.parameters() if p.requires_grad])
    ).all()
