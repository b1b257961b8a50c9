"""One subject's metrics together (SubjectScorer) and the evaluation report files."""

from __future__ import annotations

import csv
import json
import math

import torch

from metrics import load_clip, load_dino
from metrics.dreambench import SubjectScorer, mean_over_subjects, write_report


def test_scorer_routes_subject_and_class_rows():
    g = torch.Generator().manual_seed(0)
    references = torch.rand(2, 3, 64, 64, generator=g)
    scorer = SubjectScorer(
        load_dino("builtin:tiny-dino"), load_clip("builtin:tiny-clip", None), references, "sks", div="dino"
    )
    images = torch.rand(4, 3, 64, 64, generator=g)
    scores = scorer.update(
        images, ["a sks ball", "a sks ball", "a ball", "a ball"], [0, 0, 1, 1], [False, False, True, True]
    )
    assert torch.isfinite(scores["dino"][:2]).all() and torch.isnan(scores["dino"][2:]).all()
    assert torch.isnan(scores["pres"][:2]).all() and torch.isfinite(scores["pres"][2:]).all()
    result = scorer.compute()
    assert set(result) == {"dino", "clip_i", "clip_t", "pres", "div"} and all(map(math.isfinite, result.values()))
    assert scorer.div_distance == "1-cos:builtin:tiny-dino"
    scorer.reset()
    scorer.update(images[:1], ["a sks ball"], [0], [False])
    assert math.isnan(scorer.compute()["div"])  # one image of a prompt: no pair


def test_report_files(tmp_path):
    per_subject = {"a": {"dino": 0.5, "div": float("nan")}, "b": {"dino": 0.7, "div": 0.2}}
    mean = mean_over_subjects(per_subject)
    assert math.isclose(mean["dino"], 0.6)
    report = {"subjects": {k: {"class": "x", "live": False, "images": 4, **v} for k, v in per_subject.items()}}
    paths = write_report(tmp_path, {**report, "mean": mean}, [{"subject": "a", "dino": 0.5}])
    loaded = json.loads(paths["json"].read_text())
    assert loaded["subjects"]["a"]["div"] is None  # JSON has no NaN
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["a", "b", "mean"] and rows[0]["div"] == "" and rows[1]["dino"] == "0.700000"
    assert paths["images"].read_text().splitlines() == ["subject,dino", "a,0.500000"]
