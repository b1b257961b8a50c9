"""Several concepts under DDP: a 2-process fit (gloo, on the CPU) in which the two ranks train on disjoint items that
together cover every concept's photos as often as its repeats say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from PIL import Image, ImageOps

from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parents[1]


class RecordItemIndices(pl.Callback):
    """Appends ``<global rank> <index> <concept> <index in the concept's dataset>`` for each training item read to the
    file named by ``RECORD_ITEMS`` (the items are read in the main process: no loader workers)."""

    def on_train_start(self, trainer, pl_module) -> None:
        seeded = trainer.train_dataloader.dataset  # SeededItems around the ConceptsDataset
        seeded.dataset = _Recorded(seeded.dataset, trainer.global_rank, os.environ["RECORD_ITEMS"])


class _Recorded:
    def __init__(self, concepts, rank: int, path: str) -> None:
        self.concepts, self.rank, self.path = concepts, rank, path

    def __len__(self) -> int:
        return len(self.concepts)

    def __getitem__(self, index: int):
        concept, within = self.concepts.locate(index)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{self.rank} {index} {concept} {within}\n")
        return self.concepts[index]


def _captioned(src: Path, dst: Path, identifier: str, invert: bool) -> Path:
    """The toy subject's photos (inverted: a second subject of another look), each captioned with its own number."""
    dst.mkdir(parents=True)
    for k, photo in enumerate(sorted(src.glob("*.png"))):
        image = Image.open(photo).convert("RGB")
        (ImageOps.invert(image) if invert else image).save(dst / photo.name)
        (dst / photo.name).with_suffix(".txt").write_text(f"a photo of {identifier} ball number {k}", encoding="utf-8")
    return dst


@pytest.mark.slow  # about a minute on a shared 2-core machine (20 s of CPU): two processes, each loading the model
def test_two_ranks_take_disjoint_items_covering_each_concepts_repeats(tmp_path, toy_subject_dir, class_images_dir):
    concepts = [
        {"name": "ball", "instance_data_dir": str(_captioned(toy_subject_dir, tmp_path / "ball", "sks", False)),
         "instance_prompt": "a photo of sks ball"},
        {"name": "inverted", "instance_data_dir": str(_captioned(toy_subject_dir, tmp_path / "inv", "zwx", True)),
         "instance_prompt": "a photo of zwx ball", "identifier": "zwx", "repeats": 2},
    ]  # fmt: skip
    data = {"instance_data_dir": None, "instance_prompt": None, "concepts": concepts}
    overlay = tmp_path / "concepts.yaml"
    overlay.write_text(yaml.safe_dump({"data": data}))
    shutil.copytree(class_images_dir, tmp_path / "class")
    record = tmp_path / "prompts.txt"
    options = (
        "--config", str(overlay), "--data.batch_size=2", "--data.random_flip=false", "--metrics.enabled=false",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks+=tests.helpers.RecordInstancePrompts",
        "--trainer.callbacks+=tests.test_concepts_ddp.RecordItemIndices",
    )  # fmt: skip
    # One epoch: 4 photos + 2 x 4 photos = 12 items, 2 per rank per step: 3 steps.
    args = fit_args(tmp_path / "runs", toy_subject_dir, tmp_path / "class", *options, steps=3)
    cmd = [sys.executable, "train.py", *args, "--trainer.strategy=ddp", "--trainer.devices=2"]
    items = tmp_path / "items.txt"
    env = {**os.environ, "RECORD_PROMPTS": str(record), "RECORD_ITEMS": str(items)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    rows = [line.split(" ", 3) for line in record.read_text(encoding="utf-8").splitlines()]
    assert {r[0] for r in rows} == {"0"} and len(rows) == 12
    per_rank = {rank: Counter(r[3] for r in rows if r[2] == rank) for rank in ("0", "1")}
    assert sum(per_rank["0"].values()) == sum(per_rank["1"].values()) == 6  # the epoch split evenly
    expected = Counter({f"a photo of sks ball number {k}": 1 for k in range(4)})
    expected.update({f"a photo of zwx ball number {k}": 2 for k in range(4)})
    assert per_rank["0"] + per_rank["1"] == expected  # each concept's photos as often as its repeats

    # The items themselves (the two repeats of a photo are two items): disjoint between the ranks, the epoch in all.
    read = [tuple(int(x) for x in line.split()) for line in items.read_text().splitlines()]
    indices = {rank: {r[1] for r in read if r[0] == rank} for rank in (0, 1)}
    assert len(read) == 12 and len(indices[0]) == len(indices[1]) == 6
    assert not indices[0] & indices[1] and indices[0] | indices[1] == set(range(12))
    assert Counter((r[2], r[3]) for r in read) == Counter({(0, k): 1 for k in range(4)} | {(1, k): 2 for k in range(4)})
