"""model.ema_decay through the CLI on the tiny model: training unchanged, the export is the average, resume is bitwise."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from train import cli_main, main

EMA = ("--model.ema_decay=0.5", "--trainer.callbacks.init_args.every_n_train_steps=2")


def _run(args):
    cli = cli_main(args)
    folder = run_dir(cli.trainer)
    export = load_file(folder / "export" / "pytorch_lora_weights.safetensors")
    (last,) = folder.rglob("last.ckpt")
    return cli, export, torch.load(last, map_location="cpu", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_exports_the_average_trains_the_same_and_resumes_bitwise(run_args):
    _, plain_export, plain_ckpt = _run(run_args("--trainer.callbacks.init_args.every_n_train_steps=2", steps=4))
    cli, ema_export, ema_ckpt = _run(run_args(*EMA, steps=4))
    # Training (validation with the average swapped in included) leaves the raw weights as without EMA.
    assert _same(plain_ckpt["state_dict"], ema_ckpt["state_dict"])
    assert ema_ckpt["ema"]["num_updates"] == 4 and set(ema_ckpt["ema"]["shadow"]) == set(ema_ckpt["state_dict"])
    assert not _same(plain_export, ema_export), "the export is not the average"
    # The export holds the average: a LoRA up weight of the export equals its shadow.
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight"
    exported = ema_export["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"]
    assert torch.equal(exported, ema_ckpt["ema"]["shadow"][name])

    first = cli_main(run_args(*EMA, steps=2))
    (last,) = run_dir(first.trainer).rglob("last.ckpt")
    _, resumed_export, resumed_ckpt = _run(run_args(*EMA, steps=4) + ["--ckpt_path", str(last)])
    assert _same(resumed_export, ema_export)
    assert _same(resumed_ckpt["ema"]["shadow"], ema_ckpt["ema"]["shadow"])


def test_bad_ema_decay_is_a_clean_error(run_args, capsys):
    assert main(run_args("--model.ema_decay=1.5")) == 2
    assert "error: model.ema_decay must be between 0 and 1" in capsys.readouterr().err


def test_predict_from_a_checkpoint_renders_the_average_as_the_export(run_args, tmp_path):
    """``predict --ckpt_path`` of a run with EMA renders the average (what its export holds), with or without
    model.ema_decay in the predict command; the raw weights (a run without EMA trains the same) render otherwise."""
    fast = ("--model.learning_rate=0.3", "--model.train_text_encoder=false", "--trainer.limit_val_batches=0")
    folders = {}
    for name, extra in (("plain", ()), ("ema", ("--model.ema_decay=0.9",))):
        cli = cli_main(run_args(*fast, *extra, "--trainer.default_root_dir", str(tmp_path / name), steps=2))
        folders[name] = run_dir(cli.trainer)

    def predict(*overrides: str) -> np.ndarray:
        out = tmp_path / f"predicted{len(list(tmp_path.glob('predicted*')))}"
        cli_main(
            [
                "predict",
                "--config", str(folders["ema"] / "config.yaml"),  # the run's own config, as the README says
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                '--data.predict_prompts=["a photo of {identifier} {class_noun}"]',
                "--model.sampling.num_inference_steps=3",
                "--model.sampling.num_images_per_prompt=1",
                f"--render.dirpath={out}",
                *overrides,
            ]
        )  # fmt: skip
        (png,) = sorted(out.glob("0*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    (ckpt,) = folders["ema"].rglob("last.ckpt")
    from_ckpt = predict("--ckpt_path", str(ckpt))
    from_ckpt_without_option = predict("--ckpt_path", str(ckpt), "--model.ema_decay=null")
    from_export = predict(f"--model.lora_weights={folders['ema'] / 'export'}", "--model.ema_decay=null")
    raw = predict(f"--model.lora_weights={folders['plain'] / 'export'}", "--model.ema_decay=null")
    assert np.abs(from_ckpt - from_export).max() <= 1
    assert np.abs(from_ckpt_without_option - from_export).max() <= 1
    assert np.abs(raw - from_export).max() > 2, "the average and the raw weights render alike: the test shows nothing"
