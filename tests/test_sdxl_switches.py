"""The switches merged beside SDXL, on ``builtin:tiny-sdxl`` through the CLI: adapters (DoRA, LoHa, LoKr) on the UNet
and both text encoders, their kohya / LyCORIS files applied as ComfyUI applies them under kohya sd-scripts' SDXL names
(``lora_unet_input_blocks_...``, ``lora_te1_``, ``lora_te2_``), DoRA loaded by diffusers' StableDiffusionXLPipeline;
the held-out val/loss; aspect-ratio buckets (each row's size and crop in the UNet's time ids); captions with masks;
pivotal tuning (new tokens in both tokenizers and text encoders, exported as ``clip_l`` / ``clip_g``); EMA with the
loss recipes; two concepts.

ComfyUI's SDXL key map (``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``): ``lora_unet_`` + the
original-layout UNet key without ``diffusion_model.`` and ``.weight``, ``.`` as ``_``; ``lora_te1_`` / ``lora_te2_`` +
the CLIP key from ``text_model.`` on. The UNet's original names are taken here from the single file the project
writes (which diffusers' ``from_single_file`` reads back to identical weights, tests/test_sdxl.py), matched to the
diffusers layers by their weights.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from callbacks.run_dir import run_dir
from sd.export.layout import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from sd.models.families import SDXL
from sd.models.loading import load_pipeline
from sd.models.single_file import save_single_file
from sd.render.pipeline import build_pipeline
from sd.render.sampling import SamplingSettings, render
from tests.test_adapters_cli import _comfy_names, _comfy_weight, _layers, _peft_weight
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:tiny-sdxl"
QUIET = ("--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--metrics.enabled=false")
ADAPTERS = {
    "dora": ("--model.adapter=dora", "--model.lora_alpha=2"),
    "loha": ("--model.adapter=loha", "--model.lora_rank=4", "--model.lora_alpha=2"),
    "lokr": ("--model.adapter=lokr", "--model.lora_rank=2", "--model.lora_alpha=3"),
}


def _fit(root: Path, photos: Path, *overrides: str, steps: int = 2):
    """A short SDXL fit without class images (prior preservation is not what these tests are about)."""
    return cli_main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--model.pretrained_model_name_or_path", MODEL,
            "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--data.instance_data_dir", str(photos),
            "--data.class_data_dir", str(root / "class"),
            "--data.with_prior_preservation=false",
            "--model.learning_rate", "0.05",
            "--model.text_encoder_lr", "0.05",
            *overrides,
        ]
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def original_unet_names(tmp_path_factory) -> dict[str, torch.Tensor]:
    """ComfyUI's ``lora_unet_`` module name -> the base weight, from the SDXL single file's original-layout keys."""
    path = save_single_file(load_pipeline(MODEL), tmp_path_factory.mktemp("xl_single") / "xl.safetensors")
    state = load_file(path)
    prefix = "model.diffusion_model."
    return {
        "lora_unet_" + k[len(prefix) : -len(".weight")].replace(".", "_"): v
        for k, v in state.items()
        if k.startswith(prefix) and k.endswith(".weight") and v.dim() in (2, 4)
    }


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter_fit(request, tmp_path_factory, toy_subject_dir):
    root = tmp_path_factory.mktemp(f"xl_{request.param}")
    return request.param, _fit(root, toy_subject_dir, *ADAPTERS[request.param], *QUIET)


def _comfy_sdxl_names(module, original: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """ComfyUI's SDXL names -> the base layer: UNet by the original key whose weight is the layer's, text encoders
    as ``lora_te1_`` / ``lora_te2_`` + ``text_model_...``."""
    names = _comfy_names(module.text_encoder, "lora_te1_", True) | _comfy_names(
        module.text_encoder_2, "lora_te2_", True
    )
    bases = [m for m in module.unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    bases = [m for m in bases if not isinstance(m, BaseTunerLayer)]
    for name, weight in original.items():
        match = [m for m in bases if m.weight.shape == weight.shape and torch.equal(m.weight.detach(), weight)]
        if len(match) == 1:
            names[name] = match[0]
    return names


def test_sdxl_adapter_files_applied_as_comfyui_applies_them_are_the_trained_weights(adapter_fit, original_unet_names):
    adapter, cli = adapter_fit
    module = cli.model
    assert module.parts.family is SDXL
    file = load_file(run_dir(cli.trainer) / "export" / KOHYA_WEIGHT_NAME)
    modules = {k.split(".")[0] for k in file}
    for prefix in ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_",
                   "lora_te1_text_model_encoder_layers_0_", "lora_te2_text_model_encoder_layers_0_"):  # fmt: skip
        assert any(m.startswith(prefix) for m in modules), prefix
    names = _comfy_sdxl_names(module, original_unet_names)
    assert modules <= set(names), sorted(modules - set(names))[:3]  # ComfyUI finds every module of the file
    trained = [*module.unet.modules(), *module.text_encoder.modules(), *module.text_encoder_2.modules()]
    layers = {id(m.get_base_layer()): m for m in trained if isinstance(m, BaseTunerLayer) and "default" in m.r}
    assert {id(names[m]) for m in modules} == set(layers), "the file misses trained layers"
    changed = {"unet": 0, "te1": 0, "te2": 0}
    for name in sorted(modules):
        base = names[name]
        expected = _peft_weight(layers[id(base)])
        got = _comfy_weight(file, name, base.weight.detach())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        if not torch.equal(expected, base.weight.float()):
            changed[name.split("_")[1]] += 1
    assert all(changed.values()), changed  # training changed weights in the UNet and both text encoders


@pytest.mark.parametrize("adapter_fit", ["dora"], indirect=True)  # diffusers loads no LoHa / LoKr file
def test_diffusers_loads_the_sdxl_dora_file(adapter_fit):
    _, cli = adapter_fit
    pipe = load_pipeline(MODEL)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.load_lora_weights(run_dir(cli.trainer) / "export", weight_name=LORA_WEIGHT_NAME)
    module = cli.model
    for name in ("unet", "text_encoder", "text_encoder_2"):
        got = {n: _peft_weight(m) for n, m in _layers(getattr(pipe, name))}
        want = {n: _peft_weight(m) for n, m in _layers(getattr(module, name))}
        assert got.keys() == want.keys() and want, name
        assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want), name


# ----------------------------------------------------------------------------------------- held-out loss
def test_sdxl_heldout_val_loss_is_logged(tmp_path, toy_subject_dir):
    cli = _fit(
        tmp_path, toy_subject_dir, "--data.holdout=1", "--trainer.val_check_interval=2",
        '--data.validation_prompts=["a {identifier} {class_noun}"]', "--data.pres_prompt=null",
        "--model.sampling.num_images_per_prompt=1", "--model.sampling.num_inference_steps=2", steps=2,
    )  # fmt: skip
    rows = csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv"))
    losses = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert [s for s, _ in losses] == [0, 2] and all(np.isfinite(v) for _, v in losses)
    assert losses[0][1] != losses[1][1]  # the trained model's loss on the held-out photo
    assert cli.datamodule.heldout.pixels.shape[0] == 1 and not cli.datamodule.heldout.on_training_photos


# ----------------------------------------------------------------------------------------- buckets
class RecordTimeIds(pl.Callback):
    """Each training step's batch sizes / crops and the time ids the UNet received (a forward pre-hook)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = []  # sizes, crops, bucket
        self.time_ids: list[torch.Tensor] = []
        self._hook = None
        self._in_step = False

    def on_train_start(self, trainer, pl_module) -> None:
        def hook(unet, args, kwargs):
            if self._in_step:  # training steps only, not the validation renders
                self.time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].detach().cpu().clone())

        self._hook = pl_module.unet.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        latents = "latent_mean" in batch
        image = batch["latent_mean" if latents else "pixel_values"]
        size = [side * (pl_module.parts.vae_scale_factor if latents else 1) for side in image.shape[-2:]]
        self.batches.append((batch["original_sizes"].cpu(), batch["crop_top_lefts"].cpu(), tuple(size)))
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False

    def on_train_end(self, trainer, pl_module) -> None:
        self._hook.remove()


def test_sdxl_buckets_reach_the_unets_time_ids_and_render_non_square(tmp_path):
    from tests.test_buckets_cli import SQUARE, TALL, WIDE, _draw

    photos = _draw(tmp_path / "photos", [WIDE, WIDE, TALL, SQUARE])
    cli = _fit(
        tmp_path, photos, *QUIET, "--data.buckets=true", "--data.random_flip=false",
        "--trainer.callbacks+=tests.test_sdxl_switches.RecordTimeIds", steps=3,
    )  # fmt: skip
    rec = next(c for c in cli.trainer.callbacks if isinstance(c, RecordTimeIds))
    buckets = cli.datamodule.train_dataset.dataset.buckets
    assert len(buckets) == 3 and any(h != w for h, w in buckets)
    assert len(rec.batches) == len(rec.time_ids) == 3
    shapes = set()
    for (sizes, crops, target), ids in zip(rec.batches, rec.time_ids, strict=True):
        shapes.add(target)  # the batch's bucket, (height, width) in pixels
        want = torch.cat([sizes, crops, torch.tensor([target] * len(sizes))], dim=1)
        assert torch.equal(ids.long(), want), (ids, want)
    assert len(shapes) >= 2  # batches of different buckets, each with its own target size
    assert any(crop.any() for _, crops, _ in rec.batches for crop in crops)  # a cropped photo's offset reached it
    h, w = next(b for b in buckets if b[0] != b[1])
    settings = SamplingSettings(num_images_per_prompt=1, guidance_scale=5.0, num_inference_steps=2)
    image = render(build_pipeline(cli.model.sampling_parts(), "dpm++"), ["a photo of sks ball"], [0], settings, h, w)
    assert image.shape == (1, 3, h, w) and torch.isfinite(image).all()


# ----------------------------------------------------------------------------------------- captions and masks
def test_sdxl_captions_and_masks_in_one_fit(tmp_path, toy_subject_dir):
    from tests.helpers import RecordPrompts

    photos = tmp_path / "photos"
    shutil.copytree(toy_subject_dir, photos)
    for i, photo in enumerate(sorted(photos.glob("*.png"))):
        photo.with_suffix(".txt").write_text(f"a photo of {{identifier}} ball number {i}", encoding="utf-8")
        with Image.open(photo) as im:
            w, h = im.size
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask, "L").save(photo.with_name(f"{photo.stem}_mask.png"))
    cli = _fit(tmp_path, photos, *QUIET, "--trainer.callbacks+=tests.helpers.RecordPrompts", steps=2)
    rec = next(c for c in cli.trainer.callbacks if isinstance(c, RecordPrompts))
    prompts = {p for batch in rec.prompts for p in batch}
    assert prompts and all(p.startswith("a photo of sks ball number ") for p in prompts)
    for weight in rec.loss_weights:  # the masks reached the loss: half of each row weighs 0
        assert weight is not None and 0 < float(weight.mean()) < 1
    assert (run_dir(cli.trainer) / "export" / KOHYA_WEIGHT_NAME).exists()


# ----------------------------------------------------------------------------------------- pivotal tuning
TOKENS = ("--data.new_tokens=[<s0>, <s1>]", "--model.new_token_init=ball", "--model.new_token_lr=0.05")
PIVOTAL_PROMPT = "a photo of <s0><s1> ball"  # "a photo of sks ball" as the text encoders read it


def _render_xl(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    out = pipe(PIVOTAL_PROMPT, num_inference_steps=2, guidance_scale=1.0, height=64, width=64, generator=g,
               output_type="np")  # fmt: skip
    return out.images


@pytest.fixture(scope="module")
def pivotal_xl(tmp_path_factory, toy_subject_dir):
    """Two new tokens on SDXL: UNet LoRA, both text encoders frozen but for the new tokens' rows; 3 steps."""
    root = tmp_path_factory.mktemp("xl_pivotal")
    cli = _fit(root, toy_subject_dir, *TOKENS, *QUIET, "--model.train_text_encoder=false", steps=3)
    return cli, run_dir(cli.trainer)


def test_sdxl_new_tokens_train_in_both_encoders_and_export_clip_l_and_clip_g(pivotal_xl):
    from sd.adapters.new_tokens import EMBEDDINGS_NAME

    cli, folder = pivotal_xl
    module = cli.model
    (last,) = folder.rglob("last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    rows = {k: v for k, v in saved.items() if k.startswith("text_encoder")}
    assert len(rows) == 2 and all(k.endswith("token_embedding.new") for k in rows)  # only the new rows are saved
    (l_key,) = [k for k in rows if k.startswith("text_encoder.")]
    (g_key,) = [k for k in rows if k.startswith("text_encoder_2.")]
    exported = load_file(folder / "export" / EMBEDDINGS_NAME)
    assert set(exported) == {"clip_l", "clip_g"}  # AUTOMATIC1111's / ComfyUI's SDXL embedding keys
    assert torch.equal(exported["clip_l"], rows[l_key]) and torch.equal(exported["clip_g"], rows[g_key])
    for key, encoder, tokenizer in (
        ("clip_l", "text_encoder", "tokenizer"),
        ("clip_g", "text_encoder_2", "tokenizer_2"),
    ):
        base = load_pipeline(MODEL)
        table, tok = getattr(base, encoder).get_input_embeddings().weight, getattr(base, tokenizer)
        ball = table[tok("ball", add_special_tokens=False).input_ids].mean(0)
        assert exported[key].shape == (2, table.shape[1]) == (2, getattr(module, encoder).config.hidden_size)
        assert not torch.allclose(exported[key][0], ball), f"{key}: the new rows did not train"
        ids = getattr(module.parts, tokenizer)(PIVOTAL_PROMPT).input_ids
        assert ids.count(table.shape[0]) == 1 and ids.count(table.shape[0] + 1) == 1  # each tokenizer has both
    assert exported["clip_l"].shape[1] != exported["clip_g"].shape[1]  # tiny-sdxl: the encoders' widths differ
    groups = {g["name"]: len(g["params"]) for g in cli.trainer.optimizers[0].param_groups}
    assert groups["new_tokens"] == 2 and "text_encoder" not in groups and "text_encoder_2" not in groups


def test_sdxl_new_tokens_load_in_diffusers_and_render_like_the_trained_module(pivotal_xl):
    from diffusers import StableDiffusionXLPipeline

    from sd.adapters.new_tokens import EMBEDDINGS_NAME
    from sd.export.folder import load_export

    cli, folder = pivotal_xl
    export, module = folder / "export", cli.model
    base = load_pipeline(MODEL)
    trained = StableDiffusionXLPipeline(
        **{**base.components, "unet": module.unet, "text_encoder": module.text_encoder,
           "text_encoder_2": module.text_encoder_2, "tokenizer": module.parts.tokenizer,
           "tokenizer_2": module.parts.tokenizer_2},
        add_watermarker=False,
    )  # fmt: skip
    expected = _render_xl(trained)

    pipe = load_pipeline(MODEL)
    pipe.load_lora_weights(export, weight_name=LORA_WEIGHT_NAME)
    without = _render_xl(pipe)
    state = load_file(export / EMBEDDINGS_NAME)
    pipe.load_textual_inversion(
        state["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )  # diffusers' own loader, as the README says
    np.testing.assert_allclose(_render_xl(pipe), expected, atol=1e-5)
    assert np.abs(without - expected).max() > 1e-3, "the new tokens change nothing: the test shows nothing"
    np.testing.assert_allclose(_render_xl(load_export(export)), expected, atol=1e-5)


def test_sdxl_predict_with_new_tokens_from_export_and_checkpoint(pivotal_xl, tmp_path):
    _, folder = pivotal_xl

    def predict(*overrides: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        cli_main(
            ["predict", "--config", str(folder / "config.yaml"), "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", '--data.predict_prompts=["a photo of {identifier} {class_noun}"]',
             "--model.sampling.num_inference_steps=2", "--model.sampling.num_images_per_prompt=1",
             f"--render.dirpath={out}", *overrides]
        )  # fmt: skip
        (png,) = sorted(out.glob("0*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    (last,) = folder.rglob("last.ckpt")
    from_export = predict(f"--model.lora_weights={folder / 'export'}")
    assert np.abs(from_export - predict("--ckpt_path", str(last))).max() <= 1


# ----------------------------------------------------------------------------------------- EMA, loss recipes, concepts
def test_sdxl_ema_with_the_loss_recipes_exports_the_average(tmp_path, toy_subject_dir):
    """EMA of the UNet's and both text encoders' adapters, with min-SNR weighting, offset noise and input perturbation
    on: the export holds the average (a text_encoder_2 weight checked), which is not the raw weights."""
    recipes = ("--model.snr_gamma=5", "--model.noise_offset=0.05", "--model.input_perturbation=0.1")
    cli = _fit(tmp_path, toy_subject_dir, *QUIET, "--model.ema_decay=0.5", *recipes, steps=3)
    folder = run_dir(cli.trainer)
    (last,) = folder.rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    shadow, raw = ckpt["ema"]["shadow"], ckpt["state_dict"]
    assert ckpt["ema"]["num_updates"] == 3 and set(shadow) == set(raw)
    export = load_file(folder / "export" / LORA_WEIGHT_NAME)
    (name,) = [k for k in raw if k.startswith("text_encoder_2.") and "layers.0.self_attn.q_proj.lora_B" in k]
    up = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"  # diffusers' name
    exported = export[up]
    assert torch.equal(exported, shadow[name]) and not torch.equal(shadow[name], raw[name])
    assert all(torch.isfinite(v).all() for v in export.values())


def test_sdxl_two_concepts_each_with_its_prompt(tmp_path, toy_subject_dir):
    import yaml

    from tests.helpers import RecordPrompts

    other = tmp_path / "other"
    other.mkdir()
    for photo in sorted(toy_subject_dir.glob("*.png"))[:2]:
        with Image.open(photo) as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(other / photo.name)
    concepts = [
        {"name": "ball", "instance_data_dir": str(toy_subject_dir), "instance_prompt": "a photo of sks ball"},
        {"name": "inverted", "instance_data_dir": str(other), "instance_prompt": "a photo of zwx ball",
         "identifier": "zwx"},
    ]  # fmt: skip
    overlay = tmp_path / "concepts.yaml"
    overlay.write_text(
        yaml.safe_dump({"data": {"instance_data_dir": None, "instance_prompt": None, "concepts": concepts}})
    )
    cli = _fit(tmp_path, toy_subject_dir, *QUIET, "--config", str(overlay),
               "--trainer.callbacks+=tests.helpers.RecordPrompts", steps=3)  # fmt: skip
    rec = next(c for c in cli.trainer.callbacks if isinstance(c, RecordPrompts))
    rows = [p for batch in rec.prompts for p in batch]  # one epoch: 4 + 2 items, 3 batches of 2
    assert rows.count("a photo of sks ball") == 4 and rows.count("a photo of zwx ball") == 2
