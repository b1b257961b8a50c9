"""PNG metadata in AUTOMATIC1111's ``parameters`` format: written, read back, and atomic."""

from __future__ import annotations

import json

from PIL import Image

from sd.render.infotext import JSON_KEY, PARAMETERS_KEY, parse_parameters, render_text_chunks, save_png

SETTINGS = {
    "base_model": "builtin:tiny-sd",
    "lora_weights": "runs/a, b/export",
    "lora_scale": 0.7,
    "lora_text_encoder_scale": 0.0,
    "controlnet": None,
    "controlnet_conditioning_scale": None,
    "sampler": "dpm++",
    "num_inference_steps": 25,
    "guidance_scale": 7.5,
    "negative_prompt": "blurry, lowres",
    "height": 512,
    "width": 768,
}


def test_parameters_read_back_as_written():
    text = render_text_chunks("a sks dog, on the beach: sunset", 42, SETTINGS)[PARAMETERS_KEY]
    lines = text.split("\n")
    assert lines[0] == "a sks dog, on the beach: sunset" and lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2].startswith("Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 768x512, ")
    info = parse_parameters(text)
    assert info["Prompt"] == "a sks dog, on the beach: sunset"
    assert info["Negative prompt"] == "blurry, lowres"
    assert info["Model"] == "builtin:tiny-sd" and info["Lora"] == "runs/a, b/export"  # quoted: colon, comma
    assert info["Lora UNet scale"] == "0.7" and info["Lora TE scale"] == "0.0"
    assert "ControlNet" not in info  # settings that were not used are left out


def test_no_negative_prompt_line_without_one():
    text = render_text_chunks("a photo", 1, {**SETTINGS, "negative_prompt": ""})[PARAMETERS_KEY]
    assert "Negative prompt" not in text and parse_parameters(text)["Prompt"] == "a photo"


def test_png_holds_both_chunks(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", render_text_chunks("un chien été", 3, SETTINGS))
    image = Image.open(path)
    assert parse_parameters(image.text[PARAMETERS_KEY])["Prompt"] == "un chien été"  # non-Latin-1 safe (iTXt)
    assert json.loads(image.text[JSON_KEY])["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left
