"""Per-image captions through the CLI: sidecar .txt files and metadata files, placeholders, caption dropout and tag
shuffling (resumable bit for bit), the text-embedding cache, bad caption files, and options off changing nothing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datamodules.caches
import datamodules.dreambooth
from core.errors import InputFileError
from datamodules.captions import vary_caption
from tests.helpers import RecordPrompts
from train import cli_main

QUIET = (
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--metrics.enabled=false",
    "--model.train_text_encoder=false",  # frozen text encoder: the text-embedding cache is on
    "--trainer.callbacks+=tests.helpers.RecordPrompts",
)


def _photos(tmp_path: Path, toy_subject_dir: Path, name: str = "photos") -> Path:
    folder = tmp_path / name
    shutil.copytree(toy_subject_dir, folder)
    return folder


def _recorded(cli) -> RecordPrompts:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordPrompts))


def _export(cli) -> dict[str, torch.Tensor]:
    return load_file(Path(cli.trainer.log_dir) / "export" / "pytorch_lora_weights.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sidecar_captions_with_placeholders_are_what_rows_train_on(run_args, tmp_path, toy_subject_dir):
    folder = _photos(tmp_path, toy_subject_dir)
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    captions = {
        images[0]: "a photo of {identifier} {class_noun} on a red wall\n",
        images[1]: "{identifier} {class_noun}, blue wall",
    }  # the other photos have none: they train on the instance prompt
    for image, caption in captions.items():
        image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    cli = cli_main(run_args(*QUIET, f"--data.instance_data_dir={folder}", "--data.batch_size=2", steps=4))
    rec = _recorded(cli)
    instance_rows = {p for batch in rec.prompts for p in batch[: len(batch) // 2]}
    class_rows = {p for batch in rec.prompts for p in batch[len(batch) // 2 :]}
    assert instance_rows == {"a photo of sks ball on a red wall", "sks ball, blue wall", "a photo of sks ball"}
    assert class_rows == {"a photo of ball"}
    assert all(rec.cached_embeddings)  # every distinct caption was in the text-embedding cache


@pytest.mark.parametrize("form", ["jsonl", "csv"])
def test_metadata_file_captions(run_args, tmp_path, toy_subject_dir, form):
    folder = _photos(tmp_path, toy_subject_dir)
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
    rows = [(n, f"{{identifier}} ball number {i}") for i, n in enumerate(names)]
    if form == "jsonl":
        text = "\n".join(json.dumps({"file_name": n, "text": t}) for n, t in rows)
    else:
        text = "file_name,text\n" + "".join(f"{n},{t}\n" for n, t in rows)
    (folder / f"metadata.{form}").write_text(text, encoding="utf-8")
    cli = cli_main(run_args(*QUIET, f"--data.instance_data_dir={folder}", "--data.batch_size=4", steps=1))
    (batch,) = _recorded(cli).prompts
    assert sorted(batch[:4]) == sorted(f"sks ball number {i}" for i in range(4))


def test_captions_the_same_as_the_prompt_or_turned_off_train_bitwise_as_before(run_args, tmp_path, toy_subject_dir):
    """Options off change nothing: a folder whose captions all say the instance prompt, or a captioned folder with
    data.captions=false, train the same weights bit for bit as the plain folder with default options."""
    plain = _export(cli_main(run_args(*QUIET, steps=3)))
    same = _photos(tmp_path, toy_subject_dir, "same")
    for image in same.glob("*.png"):
        image.with_suffix(".txt").write_text("a photo of sks ball", encoding="utf-8")
    assert _same(_export(cli_main(run_args(*QUIET, f"--data.instance_data_dir={same}", steps=3))), plain)
    other = _photos(tmp_path, toy_subject_dir, "other")
    for image in other.glob("*.png"):
        image.with_suffix(".txt").write_text("a photo of sks ball in the snow", encoding="utf-8")
    off = ("--data.captions=false", "--data.caption_dropout=0.0", "--data.shuffle_tags=false")
    assert _same(_export(cli_main(run_args(*QUIET, *off, f"--data.instance_data_dir={other}", steps=3))), plain)
    assert not _same(_export(cli_main(run_args(*QUIET, f"--data.instance_data_dir={other}", steps=3))), plain)


def test_dropout_and_shuffled_tags_resume_bitwise(run_args, tmp_path, toy_subject_dir, isolated_data_cache):
    folder = _photos(tmp_path, toy_subject_dir)
    for i, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"sks ball, tag a{i}, tag b{i}, tag c{i}, tag d{i}", encoding="utf-8")
    vary = (
        f"--data.instance_data_dir={folder}",
        "--data.caption_dropout=0.3",
        "--data.shuffle_tags=true",
        "--data.keep_tags=1",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
        "--trainer.callbacks.init_args.save_top_k=-1",
    )
    full = cli_main(run_args(*vary, *QUIET, steps=5))
    rec = _recorded(full)
    instance = [p for batch in rec.prompts for p in batch[: len(batch) // 2]]
    assert "" in instance  # dropped out at least once in 5 steps of 2 rows (p = 0.3)...
    tagged = [p for p in instance if p]
    assert all(p.startswith("sks ball, ") for p in tagged)  # ...the kept tag stays first...
    assert len({p.split(", ", 2)[1][:5] for p in tagged}) > 1  # ...and the others move
    assert not any(rec.cached_embeddings)  # shuffled tags vary without end: the text encoder runs each step
    (ckpt,) = Path(full.trainer.log_dir).glob("checkpoints/*-step=3.ckpt")  # mid-epoch (2 batches an epoch)
    resumed = cli_main(run_args(*vary, *QUIET, steps=5) + ["--ckpt_path", str(ckpt)])
    assert _recorded(resumed).prompts == rec.prompts[3:]
    assert _same(_export(resumed), _export(full))


def test_dropout_alone_caches_the_empty_prompt(run_args, tmp_path, toy_subject_dir, isolated_data_cache):
    cli = cli_main(run_args(*QUIET, "--data.caption_dropout=0.5", steps=4))
    rec = _recorded(cli)
    assert all(rec.cached_embeddings)
    assert {p for batch in rec.prompts for p in batch[: len(batch) // 2]} == {"", "a photo of sks ball"}
    sidecars = [json.loads(p.read_text()) for p in isolated_data_cache.rglob("*.json")]
    assert any(d.get("kind") == "text_embedding" and d["prompt"] == "" for d in sidecars)


def test_warns_when_no_caption_names_the_identifier(run_args, tmp_path, toy_subject_dir, caplog):
    folder = _photos(tmp_path, toy_subject_dir)
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text("a ball on a wall", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="datamodules.dreambooth"):
        cli_main(run_args(*QUIET, f"--data.instance_data_dir={folder}", steps=1))
    assert "appears in no caption" in caplog.text and "'sks'" in caplog.text


def _refuse_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad caption was reported")

    monkeypatch.setattr(datamodules.caches, "load_cache", refuse)
    monkeypatch.setattr(datamodules.dreambooth, "generate_class_images", refuse)


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda f, img: img.with_suffix(".txt").write_bytes(b"caf\xe9 sks ball"), r"\.txt.*not UTF-8"),
        (lambda f, img: img.with_suffix(".txt").write_text("  \n"), r"\.txt.*empty caption"),
        (lambda f, img: (f / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n'), "nope.png"),
        (lambda f, img: (f / "metadata.jsonl").write_text("{not json\n"), r"metadata\.jsonl.*line 1"),
        (lambda f, img: (f / "metadata.csv").write_text(f"file_name,colour\n{img.name},red\n"), r"no caption"),
        (
            lambda f, img: [
                (f / "metadata.csv").write_text("file_name,text\n"),
                img.with_suffix(".txt").write_text("x"),
            ],
            "more than one form",
        ),
    ],
    ids=["not-utf8", "empty", "unknown-file", "bad-json", "no-text-column", "two-forms"],
)
def test_bad_caption_files_fail_early_naming_the_file(run_args, tmp_path, toy_subject_dir, monkeypatch, write, match):
    folder = _photos(tmp_path, toy_subject_dir)
    write(folder, sorted(folder.glob("*.png"))[0])
    _refuse_models(monkeypatch)
    with pytest.raises(InputFileError, match=match):
        cli_main(run_args(*QUIET, f"--data.instance_data_dir={folder}", steps=1))


@pytest.mark.parametrize(
    "option, match", [("--data.caption_dropout=1.0", "caption_dropout"), ("--data.keep_tags=-1", "keep_tags")]
)
def test_bad_caption_options(run_args, option, match):
    with pytest.raises(ValueError, match=match):
        cli_main(run_args(option, steps=1))


def test_vary_caption_keeps_the_first_tags_and_draws_nothing_when_off():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert vary_caption("sks dog, a, b, c", False, 0, 0.0) == "sks dog, a, b, c"
    assert torch.equal(torch.get_rng_state(), before)  # options off: no random number is drawn
    seen = {vary_caption("sks dog, red collar, a, b, c", True, 2, 0.0) for _ in range(30)}
    assert len(seen) > 1 and all(s.startswith("sks dog, red collar, ") for s in seen)
    assert all(sorted(s.split(", ")[2:]) == ["a", "b", "c"] for s in seen)


def test_the_captions_example_config_trains(run_args, tmp_path, toy_subject_dir):
    """configs/examples/captions.yaml, as an overlay on a full config: tags shuffled with the first kept."""
    folder = _photos(tmp_path, toy_subject_dir)
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text("a photo of {identifier} {class_noun}, red, round, shiny")
    example = str(Path(__file__).resolve().parents[1] / "configs" / "examples" / "captions.yaml")
    cli = cli_main(
        run_args(*QUIET, "--config", example, f"--data.instance_data_dir={folder}", "--data.batch_size=4", steps=2)
    )
    assert cli.datamodule.hparams.shuffle_tags and cli.datamodule.hparams.keep_tags == 1
    rows = [p for batch in _recorded(cli).prompts for p in batch[:4]]
    assert {p.split(", ")[0] for p in rows if p} == {"a photo of sks dog"}
    assert len({p for p in rows if p}) > 1


def test_text_embedding_cache_encodes_only_a_changed_caption(run_args, tmp_path, toy_subject_dir, monkeypatch):
    """One cache entry per distinct caption: a second fit after one caption changed encodes that caption alone, and
    trains the same weights bit for bit as a fit that encoded every caption afresh."""
    import sd.training.diffusion

    encoded: list[list[str]] = []
    encode = sd.training.diffusion.encode_prompts

    def counting(family, tokenizers, text_encoders, prompts):
        encoded.append(list(prompts))
        return encode(family, tokenizers, text_encoders, prompts)

    monkeypatch.setattr(sd.training.diffusion, "encode_prompts", counting)
    folder = _photos(tmp_path, toy_subject_dir)
    images = sorted(folder.glob("*.png"))
    for i, image in enumerate(images):
        image.with_suffix(".txt").write_text(f"{{identifier}} ball, tag {i}", encoding="utf-8")
    cache = tmp_path / "cache"
    args = (*QUIET, f"--data.instance_data_dir={folder}", "--data.batch_size=2")
    cli_main(run_args(*args, f"--data.cache_dir={cache}", steps=2))
    assert sorted(p for call in encoded for p in call) == sorted(
        [f"sks ball, tag {i}" for i in range(4)] + ["a photo of ball"]
    )
    assert all(len(call) == 1 for call in encoded)  # each alone: an entry never depends on its batch mates
    before = {p.name: p.stat().st_mtime_ns for p in (cache / "text").glob("*.safetensors")}
    assert len(before) == 5

    images[2].with_suffix(".txt").write_text("{identifier} ball, a changed tag", encoding="utf-8")
    encoded.clear()
    reused = cli_main(run_args(*args, f"--data.cache_dir={cache}", steps=2))
    assert encoded == [["sks ball, a changed tag"]]  # only the changed caption
    after = {p.name: p.stat().st_mtime_ns for p in (cache / "text").glob("*.safetensors")}
    assert len(after) == 6 and all(after[name] == mtime for name, mtime in before.items())  # the others untouched
    assert all(_recorded(reused).cached_embeddings)

    encoded.clear()
    fresh = cli_main(run_args(*args, f"--data.cache_dir={tmp_path / 'fresh_cache'}", steps=2))
    assert len(encoded) == 5
    assert _same(_export(reused), _export(fresh))
