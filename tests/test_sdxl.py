"""SDXL through the same CLI as SD 1.x (``sd/models/families.py``): LoRA and full fits on
``builtin:tiny-sdxl`` with class images made by the SDXL pipeline, its exports loaded by ``StableDiffusionXLPipeline``
(diffusers and kohya files), bitwise resume, ``predict`` at a non-square size. One fit serves many assertions."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from callbacks.run_dir import run_dir
from datamodules.datasets import DreamBoothDataset, collate_dreambooth
from sd.export.folder import load_lora_into_pipeline
from sd.models.families import SD1, SD2, SDXL
from sd.models.loading import check_model_path, load_pipeline
from sd.render.pipeline import build_pipeline, make_sampler
from sd.render.sampling import SamplingSettings, render
from sd.training.diffusion import TextConditioning, unet_conditioning
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:tiny-sdxl"
PROMPT = "a photo of sks ball"


def _fit(tmp: Path, subject: Path, *overrides: str, steps: int = 2, class_dir: Path | None = None):
    return cli_main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--model.pretrained_model_name_or_path", MODEL,
            "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(tmp / "runs"),
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(tmp / "runs"),
            "--trainer.enable_progress_bar", "false",
            "--data.instance_data_dir", str(subject),
            "--data.class_data_dir", str(class_dir or tmp / "class"),
            "--data.num_class_images", "2",
            "--data.class_images_inference_steps", "2",
            "--model.learning_rate", "0.05",
            "--model.text_encoder_lr", "0.05",
            "--model.lora_rank", "4",
            *overrides,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, toy_subject_dir):
    """LoRA on the UNet and both text encoders (tiny.yaml trains the text encoder), with prior preservation on class
    images that the SDXL pipeline generates, validation grids and metrics: the trained CLI object."""
    tmp = tmp_path_factory.mktemp("sdxl_lora")
    cli = _fit(tmp, toy_subject_dir, "--trainer.num_sanity_val_steps=0", "--model.sampling.num_inference_steps=2")
    return cli, tmp


def test_lora_fit_trains_both_text_encoders_on_sdxl_class_images(lora_run):
    cli, tmp = lora_run
    module = cli.model
    assert module.parts.family is SDXL
    trained = module.trained_state_keys()
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and "lora_" in k for k in trained), part
    groups = {g["name"]: g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert groups == {"unet": 0.05, "text_encoder": 0.05, "text_encoder_2": 0.05}  # the text encoders' own rate
    record = json.loads(next((tmp / "class").glob("*.json")).read_text())  # made by the SDXL pipeline, 2 of them
    assert record["pretrained_model_name_or_path"] == MODEL and len(list((tmp / "class").glob("*.png"))) == 2
    folder = run_dir(cli.trainer)
    assert list((folder / "grids").glob("step_*.png"))  # validation rendered through StableDiffusionXLPipeline
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert set(saved) == trained  # only what trains, text_encoder_2's adapters included


def test_every_trained_weight_gets_a_gradient(lora_run):
    """What DDP requires (it refuses parameters without a gradient): the first text encoder gives SDXL only its
    penultimate hidden states, so its last layer and final norm are not trained; every weight that trains gets a
    gradient from one step's loss."""
    from sd.training.diffusion import add_noise

    cli, _ = lora_run
    module = cli.model
    last_layer = [n for n, p in module.text_encoder.named_parameters() if ".layers.1." in n and "lora_" in n]
    assert last_layer and not any(p.requires_grad for n, p in module.text_encoder.named_parameters() if n in last_layer)
    batch = next(iter(cli.datamodule.train_dataloader()))
    latents = module._latents(batch)
    noisy, _, timesteps = add_noise(module.parts.noise_scheduler, latents)
    context, extra = module.unet_condition(batch, latents)
    module.unet(noisy, timesteps, context, **extra).sample.pow(2).mean().backward()
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.startswith("text_encoder.") for n in trained) and any(n.startswith("text_encoder_2.") for n in trained)
    assert [n for n, p in trained.items() if p.grad is None] == []
    module.zero_grad(set_to_none=True)


def _render_diffusers(pipe, seed: int = 0) -> torch.Tensor:
    pipe.scheduler = make_sampler("dpm++", pipe.scheduler.config)
    out = pipe(
        PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=96, output_type="pt",
        generator=[torch.Generator().manual_seed(seed)],
    )  # fmt: skip
    return out.images.float().clamp(0, 1)


def test_exports_load_in_diffusers_and_render_like_the_training_pipeline(lora_run):
    cli, _ = lora_run
    export = run_dir(cli.trainer) / "export"
    with safe_open(str(export / "pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(export / "pytorch_lora_weights_kohya.safetensors")
    for prefix in (
        "lora_unet_input_blocks_",
        "lora_unet_output_blocks_",
        "lora_unet_middle_block_",
        "lora_te1_text_model_",
        "lora_te2_text_model_",
    ):
        assert any(k.startswith(prefix) for k in kohya), prefix  # kohya sd-scripts' SDXL names (original UNet layout)
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks")) for k in kohya)
    assert all(float(kohya[k]) == 4.0 for k in kohya if k.endswith(".alpha"))  # tiny.yaml: rank 4, alpha = rank

    settings = SamplingSettings(num_images_per_prompt=1, guidance_scale=5.0, num_inference_steps=3)
    module = cli.model
    trained = render(build_pipeline(module.sampling_parts(), "dpm++"), [PROMPT], [0], settings, 64, 96)
    base = load_pipeline(MODEL)
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    before = _render_diffusers(base)
    base.load_lora_weights(str(export))  # diffusers' own loader
    after = _render_diffusers(base)
    assert trained.shape == (1, 3, 64, 96)
    assert (after - before).abs().max() > 1e-3  # the adapters act
    assert (after - trained).abs().max() < 1e-4  # and render as the trained module does
    kohya_pipe = load_lora_into_pipeline(load_pipeline(MODEL), export / "pytorch_lora_weights_kohya.safetensors")
    assert (_render_diffusers(kohya_pipe) - after).abs().max() < 1e-4  # the kohya file holds the same update
    diffusers_kohya = load_pipeline(MODEL)
    diffusers_kohya.load_lora_weights(str(export), weight_name="pytorch_lora_weights_kohya.safetensors")
    assert (_render_diffusers(diffusers_kohya) - after).abs().max() < 1e-4


def test_predict_renders_non_square_with_lora_scales(lora_run, tmp_path):
    cli, _ = lora_run
    export = run_dir(cli.trainer) / "export"

    def predict(folder: str, *overrides: str) -> list[np.ndarray]:
        cli_main(
            ["predict", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.pretrained_model_name_or_path={MODEL}",
             "--data.predict_prompts", f'["{PROMPT}"]', "--model.sampling.num_images_per_prompt=1",
             "--model.sampling.num_inference_steps=2", "--model.sampling.height=64", "--model.sampling.width=96",
             "--render.dirpath", str(tmp_path / folder), "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--data.instance_data_dir", str(tmp_path), *overrides]
        )  # fmt: skip
        return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp_path / folder).glob("0*.png"))]

    lora = predict("lora", f"--model.lora_weights={export}")
    off = predict("off", f"--model.lora_weights={export}", "--model.sampling.lora_scale=0",
                  "--model.sampling.lora_text_encoder_scale=0")  # fmt: skip
    base = predict("base", "--model.use_lora=false")
    assert lora[0].shape == (64, 96, 3)
    assert np.abs(lora[0] - base[0]).max() > 2  # the LoRA changes the render
    assert np.abs(off[0] - base[0]).max() <= 1  # scales 0 render the base model


def test_sdxl_lora_resume_gives_the_same_weights_bitwise(tmp_path, toy_subject_dir, lora_run):
    _, lora_tmp = lora_run  # its class images serve here too
    quiet = ("--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
    every_step = ("--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1")
    reference = _fit(tmp_path / "a", toy_subject_dir, *quiet, *every_step, steps=3, class_dir=lora_tmp / "class")
    ref_dir = run_dir(reference.trainer)
    (ckpt,) = (ref_dir / "checkpoints").glob("*-step=2.ckpt")
    resumed = _fit(
        tmp_path / "b", toy_subject_dir, *quiet, "--ckpt_path", str(ckpt), steps=3, class_dir=lora_tmp / "class"
    )
    assert resumed.trainer.global_step == 3
    a = load_file(ref_dir / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(run_dir(resumed.trainer) / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tune_with_a_separate_vae_exports_a_diffusers_folder_and_one_file(
    tmp_path, toy_subject_dir, lora_run
):
    """A full UNet fine-tune with ``model.vae`` (a VAE folder of its own, here SDXL's with ``force_upcast`` off as in
    the fp16-fix VAE): the export is a StableDiffusionXLPipeline folder with the trained UNet and that VAE, and the same
    weights as one file in the original SDXL layout, which diffusers' from_single_file reads back to identical weights
    (and which is a base model here too)."""
    _, lora_tmp = lora_run
    vae_dir = tmp_path / "vae"
    shutil.copytree(Path(check_model_path(MODEL)) / "vae", vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    cli = _fit(
        tmp_path, toy_subject_dir, "--model.use_lora=false", "--model.train_text_encoder=false",
        f"--model.vae={vae_dir}", "--model.lr_warmup_steps=0", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        steps=1, class_dir=lora_tmp / "class",
    )  # fmt: skip
    export = run_dir(cli.trainer) / "export"
    pipe = load_pipeline(str(export / "pipeline"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae.config.force_upcast is False  # the separate VAE went into the export
    trained = cli.model.unet.state_dict()
    exported = pipe.unet.state_dict()
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
    base = load_pipeline(MODEL).unet.state_dict()
    assert any(not torch.equal(base[k], exported[k]) for k in base)  # the UNet trained
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    for prefix in ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.transformer.",
                   "model.diffusion_model.label_emb.0.0.", "first_stage_model."):  # fmt: skip
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "conditioner.embedders.1.model.text_projection" in keys
    single = load_pipeline(str(export / "model.safetensors"), single_file_config=MODEL)
    assert type(single).__name__ == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_batches_carry_each_rows_size_and_crop_and_sdxl_reads_them(tmp_path):
    """``original_sizes`` / ``crop_top_lefts`` from the data pipeline: a 80x64 photo (w x h) resized to 80x64 at 64 px
    and center-cropped is cut 8 px from the left; SDXL's time ids are (64, 80, 0, 8, 64, 64); SD 1.x / 2.x get none."""
    Image.new("RGB", (80, 64), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "class.png")
    ds = DreamBoothDataset([tmp_path / "wide.png"], "a sks thing", 64, [tmp_path / "class.png"], "a thing")
    batch = collate_dreambooth([ds[0]])
    assert batch["original_sizes"].tolist() == [[64, 80], [64, 64]]
    assert batch["crop_top_lefts"].tolist() == [[0, 8], [0, 0]]
    assert batch["original_sizes"].dtype == torch.long
    text = TextConditioning(torch.zeros(2, 77, 8), torch.zeros(2, 4))
    sizes = (batch["original_sizes"], batch["crop_top_lefts"])
    ids = unet_conditioning(SDXL, text, sizes, (64, 64))["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[64, 80, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert unet_conditioning(SD1, text, sizes, (64, 64)) == {} == unet_conditioning(SD2, text, sizes, (64, 64))


@pytest.mark.parametrize("name", ["sdxl_lora.yaml", "sdxl_dreambooth.yaml"])
def test_sdxl_configs_load(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    import yaml

    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["resolution"] == 1024  # SDXL's native size
    assert config["model"]["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "vae" in config["model"]


def test_sdxl_single_files_are_detected_and_checked_for_both_text_encoders(tmp_path):
    """An SDXL base single file is told from its keys (SDXL, not refused as another family); one without the first
    text encoder's weights is named incomplete before any weights load."""
    from safetensors.torch import save_file

    from core.errors import InputFileError
    from sd.models.loading import detect_family

    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.ln_final.weight"]  # fmt: skip
    path = tmp_path / "xl.safetensors"
    save_file({k: torch.zeros(8, 4, 3, 3) if "input_blocks" in k else torch.zeros(1) for k in keys}, str(path))
    assert detect_family(str(path)) is SDXL
    partial = tmp_path / "partial.safetensors"
    save_file(
        {k: torch.zeros(8, 4, 3, 3) if "input_blocks" in k else torch.zeros(1) for k in keys if "embedders.0" not in k},
        str(partial),
    )
    with pytest.raises(InputFileError, match=r"partial\.safetensors.*complete SDXL.*first text encoder"):
        load_pipeline(str(partial), single_file_config=MODEL)


def test_the_float32_vae_decodes_beside_a_half_precision_unet():
    """SDXL's VAE stays float32 (it overflows in float16) while the UNet and text encoders run in half precision (as
    under ``16-true`` / ``bf16-true`` rendering): the latents are decoded in float32, not handed over in half."""
    pipe = load_pipeline(MODEL)
    settings = SamplingSettings(num_images_per_prompt=1, guidance_scale=5.0, num_inference_steps=2)
    full = render(pipe, [PROMPT], [0], settings, 64, 64)
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        part.to(torch.bfloat16)
    half = render(pipe, [PROMPT], [0], settings, 64, 64)
    assert pipe.vae.dtype == torch.float32 and half.dtype == torch.float32
    assert torch.isfinite(half).all() and (half - full).abs().mean() < 0.05


def test_a_missing_vae_is_named_before_any_work(tmp_path, capsys):
    from tests.conftest import fit_args
    from train import main

    args = fit_args(tmp_path / "runs", tmp_path, tmp_path / "class", f"--model.vae={tmp_path / 'no_vae'}", steps=1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: model.vae: {str(tmp_path / 'no_vae')!r} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "class").exists()  # no class image was made


def test_dreambench_test_renders_and_scores_an_sdxl_lora(lora_run, tmp_path, toy_subject_dir):
    """``test`` (the DreamBench protocol) on the run's own subject with the SDXL LoRA export: a complete report."""
    cli, _ = lora_run
    export = run_dir(cli.trainer) / "export"
    test = cli_main(
        ["test", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--model.pretrained_model_name_or_path={MODEL}",
         f"--model.lora_weights={export}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.instance_data_dir", str(toy_subject_dir),
         "--data.class_noun=ball", "--data.eval_num_prompts=1", "--data.eval_num_images=2",
         "--model.sampling.num_inference_steps=2", "--evaluation.dirname", str(tmp_path / "eval")]
    )  # fmt: skip
    assert test.trainer.state.finished
    report = json.loads(next((tmp_path / "eval").rglob("report.json")).read_text())
    (subject,) = report["subjects"].values()
    assert subject["images"] == 2 and all(np.isfinite(subject[m]) for m in ("dino", "clip_i", "clip_t"))


def test_scale_sweep_renders_and_scores_an_sdxl_lora(lora_run, tmp_path, toy_subject_dir):
    """``scripts/scale_sweep.py`` on the SDXL LoRA export: the LoRA scales of the UNet and of both text encoders reach
    the SDXL pipeline (scale 0 and 1 score differently), one row per cell, the grid written."""
    from scripts.scale_sweep import main as scale_sweep

    cli, _ = lora_run
    out = tmp_path / "sweep"
    scale_sweep(
        ["--base", MODEL, "--lora", str(run_dir(cli.trainer) / "export"), "--instance-dir", str(toy_subject_dir),
         "--class-noun", "ball", "--prompts", "a photo of {identifier} {class_noun}", "--seeds", "0",
         "--guidance", "5", "--unet-scales", "0", "1", "--te-scales", "0", "1", "--steps", "2",
         "--height", "64", "--width", "96", "--dino", "builtin:tiny-dino", "--clip", "builtin:tiny-clip",
         "--clip-pretrained", "none", "--out", str(out)]
    )  # fmt: skip
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 4 and all(np.isfinite(float(r[m])) for r in rows for m in ("dino", "clip_i", "clip_t"))
    by_cell = {(r["lora_unet_scale"], r["lora_text_encoder_scale"]): r["dino"] for r in rows}
    assert by_cell[("0.000000", "0.000000")] != by_cell[("1.000000", "0.000000")]  # the UNet's LoRA acts
    assert by_cell[("1.000000", "0.000000")] != by_cell[("1.000000", "1.000000")]  # the text encoders' LoRA acts
    assert (out / "grid.png").is_file()
