"""model.ema_decay through the CLI on the tiny model: training unchanged, the export is the average, resume is bitwise."""

from __future__ import annotations

import torch
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
