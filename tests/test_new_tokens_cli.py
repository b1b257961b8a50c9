"""Pivotal tuning (``data.new_tokens``) through the CLI on the tiny model: the new tokens' rows train beside the LoRA,
are saved alone, exported as a textual-inversion embedding that diffusers' own loader reads, and render in
``predict``; off by default, training is bitwise what it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from sd.adapters.new_tokens import EMBEDDINGS_NAME, add_new_tokens, expand_identifier
from sd.export.folder import load_export
from sd.export.layout import LORA_WEIGHT_NAME
from sd.models.loading import load_part, load_pipeline
from train import cli_main, main

TINY = "builtin:tiny-sd"
TOKENS = ("--data.new_tokens=[<s0>, <s1>]", "--model.new_token_init=ball", "--model.new_token_lr=0.05")
FAST = ("--model.train_text_encoder=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
NEW_ROWS = "text_encoder.embeddings.token_embedding.new"  # transformers 5 flattens text_model


def _render(pipe: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=g, output_type="np").images


@pytest.fixture(scope="module")
def pivotal_run(tmp_path_factory, toy_subject_dir, class_images_dir):
    """One 3-step LoRA fit with two new tokens (UNet LoRA, frozen text encoder but for the new rows)."""
    import shutil

    from tests.conftest import fit_args

    tmp = tmp_path_factory.mktemp("pivotal")
    shutil.copytree(class_images_dir, tmp / "class")
    cli = cli_main(fit_args(tmp / "runs", toy_subject_dir, tmp / "class", *TOKENS, *FAST, steps=3))
    return cli, run_dir(cli.trainer)


def test_new_rows_train_and_are_saved_and_exported_alone(pivotal_run):
    cli, folder = pivotal_run
    (last,) = folder.rglob("last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert [k for k in saved if k.startswith("text_encoder.")] == [NEW_ROWS]  # the base table is not saved
    rows = saved[NEW_ROWS]
    tokenizer, text_encoder = load_part(TINY, "tokenizer"), load_part(TINY, "text_encoder")
    ball = text_encoder.get_input_embeddings().weight[tokenizer("ball", add_special_tokens=False).input_ids].mean(0)
    assert rows.shape == (2, ball.shape[0])
    assert not torch.allclose(rows[0], ball), "the new rows did not train"
    exported = load_file(folder / "export" / EMBEDDINGS_NAME)
    assert list(exported) == ["emb_params"] and torch.equal(exported["emb_params"], rows)
    groups = {g["name"]: g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups}  # before warmup
    assert groups["new_tokens"] == pytest.approx(0.05) and "text_encoder" not in groups


def test_diffusers_loads_the_export_and_renders_like_the_trained_module(pivotal_run):
    cli, folder = pivotal_run
    export = folder / "export"
    prompt = expand_identifier("a photo of sks ball", "sks", ["<s0>", "<s1>"])
    assert prompt == "a photo of <s0><s1> ball"
    base = StableDiffusionPipeline.from_pretrained(load_pipeline(TINY).name_or_path, safety_checker=None)
    module = cli.model
    trained = StableDiffusionPipeline(
        vae=base.vae, text_encoder=module.text_encoder, tokenizer=module.parts.tokenizer, unet=module.unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    expected = _render(trained, prompt)

    pipe = StableDiffusionPipeline.from_pretrained(load_pipeline(TINY).name_or_path, safety_checker=None)
    pipe.load_lora_weights(export, weight_name=LORA_WEIGHT_NAME)
    without = _render(pipe, prompt)  # <s0><s1> unknown: read as characters
    vectors = load_file(export / EMBEDDINGS_NAME)["emb_params"]
    pipe.load_textual_inversion(list(vectors), token=["<s0>", "<s1>"])  # diffusers' own loader, as the README says
    np.testing.assert_allclose(_render(pipe, prompt), expected, atol=1e-5)
    assert np.abs(without - expected).max() > 1e-3, "the new tokens change nothing: the test shows nothing"
    np.testing.assert_allclose(_render(load_export(export), prompt), expected, atol=1e-5)


def test_predict_renders_with_the_new_tokens_from_export_and_checkpoint(pivotal_run, tmp_path):
    _, folder = pivotal_run

    def predict(*overrides: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        cli_main(
            [
                "predict", "--config", str(folder / "config.yaml"), "--trainer.logger=false",
                "--trainer.enable_progress_bar=false", '--data.predict_prompts=["a photo of {identifier} {class_noun}"]',
                "--model.sampling.num_inference_steps=3", "--model.sampling.num_images_per_prompt=1",
                f"--render.dirpath={out}", *overrides,
            ]
        )  # fmt: skip
        (png,) = sorted(out.glob("0*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    (last,) = folder.rglob("last.ckpt")
    from_export = predict(f"--model.lora_weights={folder / 'export'}")
    from_ckpt = predict("--ckpt_path", str(last))
    assert np.abs(from_export - from_ckpt).max() <= 1


def test_new_tokens_off_by_default_leave_training_bitwise(run_args):
    def export(*overrides: str) -> dict[str, torch.Tensor]:
        cli = cli_main(run_args(*FAST, *overrides, steps=3))
        return load_file(run_dir(cli.trainer) / "export" / LORA_WEIGHT_NAME)

    default, off = export(), export("--data.new_tokens=null")
    assert default.keys() == off.keys() and all(torch.equal(default[k], off[k]) for k in default)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("--data.new_tokens=[<s0>, <s0>]",), "names a token twice"),
        (("--data.new_tokens=[ball]",), "already words of the tokenizer"),
        (("--data.new_tokens=[<s0>]", "--model.use_lora=false"), "set model.use_lora true"),
    ],
)
def test_bad_new_tokens_are_clean_errors(run_args, overrides, message, capsys):
    assert main(run_args(*FAST, *overrides)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_new_rows_start_from_the_init_word_and_are_looked_up_by_the_new_ids():
    tokenizer, text_encoder = load_part(TINY, "tokenizer"), load_part(TINY, "text_encoder")
    table = text_encoder.get_input_embeddings().weight.detach().clone()  # (V, D)
    emb = add_new_tokens(tokenizer, text_encoder, ["<s0>", "<s1>"], "ball")
    ball = table[tokenizer("ball", add_special_tokens=False).input_ids].mean(0)
    assert torch.equal(emb.new[0], ball) and torch.equal(emb.new[1], ball)
    ids = torch.tensor([tokenizer("a <s0><s1> ball").input_ids])  # (1, L)
    vocab = table.shape[0]
    assert ids[0].tolist().count(vocab) == 1 and ids[0].tolist().count(vocab + 1) == 1
    looked_up = text_encoder.get_input_embeddings()(ids)[0]  # (L, D)
    for k, i in enumerate(ids[0].tolist()):
        assert torch.equal(looked_up[k], emb.new[i - vocab] if i >= vocab else table[i])
    assert text_encoder(ids).last_hidden_state.shape[1] == ids.shape[1]  # the whole encoder runs with them

    random_rows = add_new_tokens(load_part(TINY, "tokenizer"), load_part(TINY, "text_encoder"), ["<a>", "<b>"]).new
    assert not torch.equal(random_rows[0], random_rows[1])
    assert abs(float(random_rows.std()) - float(table.std())) < 0.5 * float(table.std())
