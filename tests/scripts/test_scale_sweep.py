"""The scale sweep script on the tiny model with a LoRA export made by a 2-step fit."""

from __future__ import annotations

import csv
import math

import pytest
from PIL import Image

from callbacks.pictures import read_layout
from scripts.scale_sweep import main, sweep_cells


def test_sweep_cells_vary_guidance_fastest():
    cells = sweep_cells([3.0, 7.5], [0.0, 1.0], [1.0])
    assert [(c.lora_unet_scale, c.guidance_scale) for c in cells] == [(0.0, 3.0), (0.0, 7.5), (1.0, 3.0), (1.0, 7.5)]


def test_scale_sweep_writes_grid_and_scores(lora_export, toy_subject_dir, tmp_path):
    out = tmp_path / "sweep"
    main(
        [
            "--base", "builtin:tiny-sd",
            "--lora", str(lora_export / "export"),
            "--instance-dir", str(toy_subject_dir),
            "--class-noun", "ball",
            "--prompts", "a photo of {identifier} {class_noun}",
            "--seeds", "0",
            "--guidance", "1", "5",
            "--unet-scales", "0", "1",
            "--te-scales", "0", "1",
            "--steps", "2",
            "--height", "64", "--width", "64",
            "--dino", "builtin:tiny-dino", "--clip", "builtin:tiny-clip", "--clip-pretrained", "none",
            "--out", str(out),
        ]
    )  # fmt: skip
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2
    assert list(rows[0]) == [
        "guidance_scale", "lora_unet_scale", "lora_text_encoder_scale", "dino", "clip_i", "clip_t", "images"
    ]  # fmt: skip
    assert all(math.isfinite(float(r[m])) for r in rows for m in ("dino", "clip_i", "clip_t"))
    assert {(r["lora_unet_scale"], r["lora_text_encoder_scale"]) for r in rows} == {
        (u, t) for u in ("0.000000", "1.000000") for t in ("0.000000", "1.000000")
    }
    by_cell = {(r["guidance_scale"], r["lora_unet_scale"], r["lora_text_encoder_scale"]): r["dino"] for r in rows}
    assert by_cell[("5.000000", "0.000000", "0.000000")] != by_cell[("5.000000", "1.000000", "1.000000")]
    layout = read_layout(out / "grid.png")  # the subject's photos, then 4 rows of (unet, te); 2 guidance x 1 seed
    assert [r["kind"] for r in layout["rows"]] == ["reference"] + ["renders"] * 4
    assert layout["rows"][1]["label"].startswith("LoRA UNet 0, text encoder 0 | CFG 1: dino ")
    cells = [c for r in layout["rows"][1:] for c in r["cells"]]
    assert len(cells) == 8 and all(c["box"][2] - c["box"][0] == 256 for c in cells)  # 64 px x 4
    assert cells[1]["caption"][0].startswith("CFG 5, prompt 1, seed 0, dino ")
    assert Image.open(out / "grid.png").width >= 4 * 256  # the 4 photos


def test_missing_lora_export_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--base", "builtin:tiny-sd", "--lora", str(tmp_path / "nope"), "--instance-dir", ".", "--out", "x"])
    err = capsys.readouterr().err
    assert "--lora" in err and "nope" in err
