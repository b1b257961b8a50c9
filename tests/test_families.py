"""Base-model families: SD 2.x trains, exports and renders through the same code as SD 1.x (SDXL: tests/test_sdxl.py);
other families are refused by name before anything loads (``sd/models/families.py``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from callbacks.run_dir import run_dir
from sd.models.families import SD1, SD2, SDXL, UnsupportedModelError, family_of_keys
from sd.models.loading import check_model_path, detect_family, load_pipeline
from sd.models.single_file import load_single_file_pipeline
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _fake_folder(tmp_path: Path, pipeline: str, unet: dict, text_encoder: dict | None = None, **index) -> Path:
    """A diffusers folder with only its config files: detection must decide from them, before any weights load."""
    folder = tmp_path / pipeline
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index}))
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    if text_encoder is not None:
        (folder / "text_encoder").mkdir()
        (folder / "text_encoder" / "config.json").write_text(json.dumps(text_encoder))
    return folder


def test_families_of_the_builtin_models():
    assert detect_family(check_model_path("builtin:tiny-sd")) is SD1
    assert detect_family(check_model_path("builtin:toy-sd")) is SD1
    assert detect_family(check_model_path("builtin:tiny-sd2")) is SD2
    assert detect_family(check_model_path("builtin:tiny-sdxl")) is SDXL


def test_sdxl_base_is_told_from_its_configs(tmp_path):
    sdxl_unet = {"in_channels": 4, "addition_embed_type": "text_time", "cross_attention_dim": 2048}
    te2 = ["transformers", "CLIPTextModelWithProjection"]
    folder = _fake_folder(
        tmp_path, "StableDiffusionXLPipeline", sdxl_unet, {"hidden_act": "quick_gelu"}, text_encoder_2=te2
    )
    assert detect_family(check_model_path(str(folder))) is SDXL


@pytest.mark.parametrize(
    ("pipeline", "unet", "index", "named"),
    [
        ("StableDiffusionXLPipeline", {"in_channels": 4}, {}, "SDXL-like"),  # no added conditioning: not SDXL base
        ("StableDiffusionXLImg2ImgPipeline", {"in_channels": 4}, {}, "SDXL (refiner"),
        (  # the refiner: OpenCLIP bigG alone (no first text encoder), added time ids
            "StableDiffusionXLPipeline",
            {"in_channels": 4, "addition_embed_type": "text_time", "cross_attention_dim": 1280},
            {"text_encoder": [None, None], "text_encoder_2": ["transformers", "X"]},
            "SDXL refiner",
        ),
        ("StableDiffusionXLPipeline", {"in_channels": 9, "addition_embed_type": "text_time"}, {}, "SDXL inpainting"),
        ("StableDiffusion3Pipeline", {"in_channels": 16}, {}, "Stable Diffusion 3"),
        ("FluxPipeline", {"in_channels": 64}, {}, "Flux"),
        ("StableDiffusionPipeline", {"in_channels": 9}, {}, "inpainting"),
        ("StableDiffusionPipeline", {"in_channels": 4}, {"text_encoder_2": ["transformers", "X"]}, "SDXL"),
    ],
)
def test_other_families_are_refused_by_name(tmp_path, pipeline, unet, index, named):
    folder = _fake_folder(tmp_path, pipeline, unet, **index)
    with pytest.raises(UnsupportedModelError, match=re.escape(named)) as info:
        check_model_path(str(folder))
    assert str(folder) in str(info.value)


def test_another_family_is_refused_from_the_command_line_before_any_work(tmp_path, run_args):
    folder = _fake_folder(tmp_path, "StableDiffusionXLImg2ImgPipeline", {"in_channels": 4})
    args = run_args("--model.pretrained_model_name_or_path", str(folder), "--data.num_class_images=8")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "SDXL" in message and str(folder) in message, message
    assert "Traceback" not in result.stderr
    assert len(list((tmp_path / "class").glob("*.png"))) == 4  # no class image was generated: refused before any work


def _single_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


def test_single_files_are_told_apart_by_their_keys(tmp_path):
    vae, unet = "first_stage_model.encoder.conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"
    sd1 = {vae: (1,), unet: (8, 4, 3, 3), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (1,)}
    sd2 = {vae: (1,), unet: (8, 4, 3, 3), "cond_stage_model.model.ln_final.weight": (1,)}
    inpaint = {**sd1, unet: (8, 9, 3, 3)}
    sdxl = {vae: (1,), unet: (8, 4, 3, 3), "conditioner.embedders.1.model.ln_final.weight": (1,)}
    refiner = {vae: (1,), unet: (8, 4, 3, 3), "conditioner.embedders.0.model.ln_final.weight": (1,)}
    assert detect_family(str(_single_file(tmp_path / "sd1.safetensors", sd1))) is SD1
    assert detect_family(str(_single_file(tmp_path / "sd2.safetensors", sd2))) is SD2
    assert detect_family(str(_single_file(tmp_path / "xl.safetensors", sdxl))) is SDXL
    xl_inpaint = {**sdxl, unet: (8, 9, 3, 3)}
    for name, keys, named in (
        ("inpaint", inpaint, "inpainting"),
        ("xl_inpaint", xl_inpaint, "SDXL inpainting"),
        ("refiner", refiner, "refiner"),
    ):
        path = _single_file(tmp_path / f"{name}.safetensors", keys)
        with pytest.raises(UnsupportedModelError, match=named) as info:
            detect_family(str(path))
        assert str(path) in str(info.value)
    assert family_of_keys(["model.diffusion_model.x", "cond_stage_model.model.x"], "keys") is SD2


def test_sd2_lora_trains_exports_and_renders(run_args, tmp_path):
    """LoRA on the UNet and the text encoder of a v-prediction SD 2.x; the diffusers export loads in diffusers."""
    args = run_args("--model.pretrained_model_name_or_path=builtin:tiny-sd2", "--model.learning_rate=0.05", steps=2)
    cli = cli_main(args)
    out = run_dir(cli.trainer) / "export"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    base = load_pipeline("builtin:tiny-sd2")
    kw = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    before = base("a photo of sks ball", generator=torch.Generator().manual_seed(0), **kw).images
    base.load_lora_weights(str(out))
    after = base("a photo of sks ball", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-3  # the adapters act in diffusers
    kohya = load_pipeline("builtin:tiny-sd2")
    kohya.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    from_kohya = kohya("a photo of sks ball", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(from_kohya - after).max() < 1e-4  # the kohya file (AUTOMATIC1111, ComfyUI) holds the same update
    # predict renders with the export
    predict = cli_main(
        ["predict", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--model.pretrained_model_name_or_path=builtin:tiny-sd2", "--model.lora_weights", str(out),
         "--data.predict_prompts", '["a photo of sks ball"]', "--model.sampling.num_images_per_prompt=1",
         "--model.sampling.num_inference_steps=2", "--render.dirpath", str(tmp_path / "predict"),
         "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert predict.trainer.state.finished
    assert len(list((tmp_path / "predict").glob("*.png"))) >= 1


def test_sd2_full_fine_tune_exports_its_original_layout(run_args):
    """A full SD 2.x fine-tune is also written as one file in the original layout (OpenCLIP text encoder), with the
    config beside it that AUTOMATIC1111 reads (FrozenOpenCLIPEmbedder, penultimate layer, v-prediction); the file
    loads back through diffusers' from_single_file to the same weights as the exported pipeline."""
    cli = cli_main(
        run_args("--model.pretrained_model_name_or_path=builtin:tiny-sd2", "--model.use_lora=false", steps=1)
    )
    out = run_dir(cli.trainer) / "export"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in keys)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    config = yaml.safe_load((out / "model.yaml").read_text())["model"]["params"]
    assert config["parameterization"] == "v"
    assert config["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    assert config["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert config["unet_config"]["params"]["use_linear_in_transformer"] is True
    folder = load_pipeline(str(out / "pipeline"))
    single = load_single_file_pipeline(out / "model.safetensors", "builtin:tiny-sd2")
    assert single.scheduler.config.prediction_type == "v_prediction"
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_sd2_config_loads():
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs" / "sd2_lora.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_sd2_resume_gives_the_same_weights_bitwise(run_args):
    """A v-prediction SD 2.x LoRA run resumed mid-way ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    sd2 = ("--model.pretrained_model_name_or_path=builtin:tiny-sd2", "--trainer.limit_val_batches=0")
    every_step = ("--trainer.callbacks.init_args.every_n_train_steps=1", "--trainer.callbacks.init_args.save_top_k=-1")
    reference = cli_main(run_args(*sd2, *every_step, steps=3))
    ref_dir = run_dir(reference.trainer)
    (ckpt,) = (ref_dir / "checkpoints").glob("*-step=2.ckpt")
    record = "--trainer.callbacks+=tests.helpers.RecordStart"
    resumed = cli_main(run_args(*sd2, record, steps=3) + ["--ckpt_path", str(ckpt)])
    start = next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "RecordStart")
    assert start.global_step == 2 and start.optimizer_step == 2  # it resumed, not started over
    assert resumed.trainer.global_step == 3
    a = load_file(ref_dir / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(run_dir(resumed.trainer) / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
