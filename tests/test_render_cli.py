"""``train.py predict`` on the tiny model, as a user runs it: PNGs with their settings, seeds, LoRA scales, ControlNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lightning_modules.dreambooth
from callbacks.pictures import read_layout
from sd.render.infotext import JSON_KEY, PARAMETERS_KEY, parse_parameters
from sd.render.sampling import image_seed
from train import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def predict(tmp_path, toy_subject_dir):
    """Run ``predict`` (demo config, 3 sampler steps, 1 image per prompt unless overridden) into a new folder; return
    the folder. The first ``--config`` may be replaced, e.g. by a run's own config.yaml."""
    count = iter(range(100))

    def run(*overrides: str, config: Path = ROOT / "configs" / "tiny.yaml") -> Path:
        out = tmp_path / f"out{next(count)}"
        cli_main(
            [
                "predict",
                "--config", str(config),
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(tmp_path / "runs"),
                "--trainer.default_root_dir", str(tmp_path / "runs"),
                "--trainer.enable_progress_bar=false",
                "--data.instance_data_dir", str(toy_subject_dir),
                "--data.class_data_dir", str(tmp_path / "no_class_images_needed"),
                '--data.predict_prompts=["a photo of {identifier} {class_noun}"]',
                "--model.sampling.num_inference_steps=3",
                "--model.sampling.num_images_per_prompt=1",
                f"--render.dirpath={out}",
                *overrides,
            ]
        )  # fmt: skip
        return out

    return run


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("0*.png"))]


def test_predict_writes_pngs_with_their_settings(predict, lora_export, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt per line\na photo of {identifier} {class_noun}\n\na red sks ball, studio light\n")
    args = [
        f"--model.lora_weights={lora_export / 'export'}",
        f"--data.predict_prompts_file={prompts}",
        "--data.predict_prompts=null",
        "--data.predict_seed=7",
        "--model.sampling.num_images_per_prompt=2",
        "--model.sampling.negative_prompt=blurry, low quality",
        "--model.sampling.guidance_scale=4",
        "--model.sampling.sampler=euler_a",
        "--model.sampling.lora_scale=0.8",
        "--model.sampling.lora_text_encoder_scale=0.5",
        "--model.sampling.width=96",
    ]
    out = predict(*args, config=lora_export / "config.yaml")  # the run's own config, as the README says
    files = sorted(out.glob("0*.png"))
    assert [f.name[:7] for f in files] == ["000-00-", "000-01-", "001-00-", "001-01-"]
    image = Image.open(files[3])
    assert image.size == (96, 64)  # the rendered size: only the contact sheet enlarges
    sheet = read_layout(out / "contact_sheet.png")
    assert sheet["title"][1].startswith("euler_a, 3 steps, CFG 4 | 96x64 px | LoRA scale UNet 0.8, text encoder 0.5")
    assert [r["label"] for r in sheet["rows"]] == ["a photo of sks ball", "a red sks ball, studio light"]
    cells = [c for r in sheet["rows"] for c in r["cells"]]
    assert [(c["box"][2] - c["box"][0], c["box"][3] - c["box"][1]) for c in cells] == [(192, 128)] * 4  # x 2
    assert [c["caption"] for c in cells][3] == [f"seed {image_seed(7 + 1, 1)}"]
    info = parse_parameters(image.text[PARAMETERS_KEY])
    assert info == {
        "Prompt": "a red sks ball, studio light",
        "Negative prompt": "blurry, low quality",
        "Steps": "3",
        "Sampler": "Euler a",
        "CFG scale": "4.0",
        "Seed": str(image_seed(7 + 1, 1)),
        "Size": "96x64",
        "Model": "builtin:tiny-sd",
        "Lora": str(lora_export / "export"),
        "Lora UNet scale": "0.8",
        "Lora TE scale": "0.5",
        "Version": "dreambooth-lightning",
    }
    assert parse_parameters(Image.open(files[0]).text[PARAMETERS_KEY])["Prompt"] == "a photo of sks ball"
    assert '"seed": 7000' in Image.open(files[0]).text[JSON_KEY]
    # The same seed renders the same image twice.
    again = predict(*args, config=lora_export / "config.yaml")
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(out), _pixels(again), strict=True))


def test_lora_scales_apply_to_unet_and_text_encoder_separately(predict, lora_export):
    lora = f"--model.lora_weights={lora_export / 'export'}"
    base = _pixels(predict("--model.use_lora=false"))[0]
    off = _pixels(predict(lora, "--model.sampling.lora_scale=0", "--model.sampling.lora_text_encoder_scale=0"))[0]
    unet_only = _pixels(predict(lora, "--model.sampling.lora_scale=1", "--model.sampling.lora_text_encoder_scale=0"))
    te_only = _pixels(predict(lora, "--model.sampling.lora_scale=0", "--model.sampling.lora_text_encoder_scale=1"))
    assert np.array_equal(off, base), "LoRA scale 0 must render what the base model renders"
    assert np.abs(unet_only[0] - base).max() > 2, "the UNet's LoRA changes nothing"
    assert np.abs(te_only[0] - base).max() > 2, "the text encoder's LoRA changes nothing"
    assert np.abs(te_only[0] - unet_only[0]).max() > 2


def test_predict_from_a_checkpoint_matches_the_export(predict, lora_export):
    from_ckpt = _pixels(predict("--ckpt_path", str(lora_export / "checkpoints" / "last.ckpt")))
    from_export = _pixels(predict(f"--model.lora_weights={lora_export / 'export'}"))
    assert np.abs(from_ckpt[0] - from_export[0]).max() <= 1


def test_controlnet_renders_follow_the_condition_image(predict, lora_export, tmp_path, toy_subject_dir):
    pose = sorted(toy_subject_dir.glob("*.png"))
    args = [f"--model.lora_weights={lora_export / 'export'}", "--model.controlnet=builtin:tiny-controlnet"]
    first = predict(*args, f"--data.control_image={pose[0]}")
    other = predict(*args, f"--data.control_image={pose[1]}", "--model.sampling.controlnet_conditioning_scale=1.0")
    info = parse_parameters(Image.open(next(first.glob("0*.png"))).text[PARAMETERS_KEY])
    assert info["ControlNet"] == "builtin:tiny-controlnet" and info["ControlNet scale"] == "1.0"
    assert np.abs(_pixels(first)[0] - _pixels(other)[0]).max() > 2, "the condition image changes nothing"


# ------------------------------------------------------------------------------------ clear errors, before loading
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(lightning_modules.dreambooth, "load_components", refuse)


def test_missing_export_folder_is_named(predict, tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match=r"model\.lora_weights.*no_such_run"):
        predict(f"--model.lora_weights={tmp_path / 'no_such_run' / 'export'}")


def test_unreadable_control_image_is_named(predict, tmp_path, no_model_loading):
    bad = tmp_path / "pose.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"data\.control_image.*pose\.png"):
        predict("--model.controlnet=builtin:tiny-controlnet", f"--data.control_image={bad}")


def test_missing_prompts_file_is_named(predict, tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match=r"data\.predict_prompts_file.*prompts\.txt"):
        predict(f"--data.predict_prompts_file={tmp_path / 'prompts.txt'}", "--data.predict_prompts=null")


def test_controlnet_without_condition_image(predict):
    with pytest.raises(ValueError, match=r"model\.controlnet and data\.control_image"):
        predict("--model.controlnet=builtin:tiny-controlnet")


def test_fit_refuses_lora_weights(run_args, lora_export, no_model_loading):
    with pytest.raises(ValueError, match=r"model\.lora_weights.*--ckpt_path"):
        cli_main(run_args(f"--model.lora_weights={lora_export / 'export'}", steps=1))


# ----------------------------------------------------------------------------------- SD 2.x and SDXL ControlNets
def test_sd2_controlnet_renders_follow_the_condition_image(predict, toy_subject_dir):
    """An SD 2.x ControlNet (v-prediction base) through ``StableDiffusionControlNetPipeline``."""
    pose = sorted(toy_subject_dir.glob("*.png"))
    args = [
        "--model.pretrained_model_name_or_path=builtin:tiny-sd2",
        "--model.use_lora=false",
        "--model.controlnet=builtin:tiny-sd2-controlnet",
        "--model.sampling.num_inference_steps=2",
    ]
    first = predict(*args, f"--data.control_image={pose[0]}")
    other = predict(*args, f"--data.control_image={pose[1]}")
    assert np.abs(_pixels(first)[0] - _pixels(other)[0]).max() > 2, "the condition image changes nothing"


SDXL = ["--model.pretrained_model_name_or_path=builtin:tiny-sdxl", "--model.use_lora=false"]


def test_sdxl_controlnet_renders_follow_the_condition_image(predict, toy_subject_dir):
    """``StableDiffusionXLControlNetPipeline`` around the live tiny SDXL: the condition image and its scale change the
    render, scale 0 renders as without the ControlNet."""
    pose = sorted(toy_subject_dir.glob("*.png"))
    args = [
        *SDXL,
        "--model.controlnet=builtin:tiny-sdxl-controlnet",
        "--model.sampling.width=96",
        "--model.sampling.num_inference_steps=2",
    ]
    first = predict(*args, f"--data.control_image={pose[0]}")
    other = predict(*args, f"--data.control_image={pose[1]}")
    ignored = predict(*args, f"--data.control_image={pose[0]}", "--model.sampling.controlnet_conditioning_scale=0")
    plain = predict(*SDXL, "--model.sampling.width=96", "--model.sampling.num_inference_steps=2")
    info = parse_parameters(Image.open(next(first.glob("0*.png"))).text[PARAMETERS_KEY])
    assert info["ControlNet"] == "builtin:tiny-sdxl-controlnet" and info["Size"] == "96x64"
    assert _pixels(first)[0].shape == (64, 96, 3)
    assert np.abs(_pixels(first)[0] - _pixels(other)[0]).max() > 2, "the condition image changes nothing"
    assert np.abs(_pixels(first)[0] - _pixels(plain)[0]).max() > 2, "the ControlNet changes nothing"
    assert np.abs(_pixels(ignored)[0] - _pixels(plain)[0]).max() <= 1, "scale 0 should render as without it"


@pytest.mark.parametrize(
    ("base", "controlnet", "message"),
    [
        (
            "builtin:tiny-sdxl",
            "builtin:tiny-controlnet",
            r"ControlNet for Stable Diffusion 1.x / 2.x.*base model.*SDXL",
        ),
        ("builtin:tiny-sd", "builtin:tiny-sdxl-controlnet", r"ControlNet for SDXL.*base model.*Stable Diffusion 1.x"),
    ],
)
def test_a_controlnet_of_another_family_is_refused_before_loading(
    predict, no_model_loading, toy_subject_dir, base, controlnet, message
):
    pose = sorted(toy_subject_dir.glob("*.png"))[0]
    with pytest.raises(ValueError, match=r"model\.controlnet: .*" + message):
        predict(
            f"--model.pretrained_model_name_or_path={base}",
            f"--model.controlnet={controlnet}",
            f"--data.control_image={pose}",
        )
