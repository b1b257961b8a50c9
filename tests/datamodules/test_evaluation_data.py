"""``test`` data: the DreamBench subjects, their prompts and seeds, and the subject -> class table."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.evaluation import (
    EvalPromptDataset,
    EvalSubject,
    collate_eval,
    dreambench_subjects,
    read_dreambench_table,
    subject_templates,
)
from datamodules.prompts import DREAMBENCH_LIVE_PROMPTS, DREAMBENCH_OBJECT_PROMPTS

DREAMBENCH = Path(__file__).resolve().parents[3] / "shared" / "dreambench"


def test_subject_templates_pick_the_list_by_class():
    assert subject_templates("dog", "dreambench") == DREAMBENCH_LIVE_PROMPTS
    assert subject_templates("teapot", "dreambench", num_prompts=2) == DREAMBENCH_OBJECT_PROMPTS[:2]
    assert subject_templates("dog", ["a {identifier} {class_noun}"]) == ("a {identifier} {class_noun}",)


def test_eval_rows_seeds_and_batch():
    subjects = [
        EvalSubject("a", "ball", Path("a"), ("x {identifier} {class_noun}", "y {class_noun}")),
        EvalSubject("b", "dog", Path("b"), ("x {identifier} {class_noun}",)),
    ]
    rows = EvalPromptDataset(subjects, "sks", "a {class_noun}", seed=10).rows
    assert [(r["subject_index"], r["prompt"], r["prompt_seed"], r["is_class_prompt"]) for r in rows] == [
        (0, "x sks ball", 10, False),
        (0, "y ball", 11, False),
        (0, "a ball", 12, True),
        (1, "x sks dog", 10, False),
        (1, "a dog", 11, True),
    ]
    batch = collate_eval(rows[2:4], num_images=4)
    assert batch["subject_index"].tolist() == [0, 1] and batch["num_images"] == 4


@pytest.mark.skipif(not (DREAMBENCH / "prompts_and_classes.txt").is_file(), reason="../shared/dreambench is absent")
def test_the_real_dreambench_table_and_folder(caplog):
    table = read_dreambench_table(DREAMBENCH / "prompts_and_classes.txt")
    assert len(table.classes) == 30 and table.classes["bear_plushie"] == "stuffed animal"
    # The built-in copies of the prompt lists are the file's.
    assert tuple(table.object_prompts) == DREAMBENCH_OBJECT_PROMPTS
    assert tuple(table.live_prompts) == DREAMBENCH_LIVE_PROMPTS
    subjects = dreambench_subjects(DREAMBENCH)  # the subset: the subjects without a folder are skipped, with a warning
    assert {s.name for s in subjects} <= set(table.classes) and len(subjects) >= 2
    assert {s.name for s in subjects if s.live} == {s.name for s in subjects if s.class_noun in ("cat", "dog")}
    assert "have no folder" in caplog.text
