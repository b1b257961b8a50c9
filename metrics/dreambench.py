"""The DreamBench metrics of one subject, together, and the evaluation report. Lightning-free.

:class:`SubjectScorer` holds one subject's DINO, CLIP-I, CLIP-T, PRES and DIV metrics (torchmetrics, so they
synchronize under DDP) and routes a batch of renders to them: subject prompts to DINO / CLIP-I / CLIP-T / DIV, the
bare class prompt to PRES. Validation scores the run's subject with one; ``test`` one per subject; the scale sweep one
per grid cell. :func:`write_report` writes the per-subject and mean scores as JSON and CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from core.safe_files import atomic_write_text
from metrics.encoders import ClipEncoder, ImageEncoder
from metrics.subject import Diversity, PreservationScore, PromptFidelity, SubjectFidelity, strip_identifier

METRIC_NAMES = ("dino", "clip_i", "clip_t", "pres", "div")
PER_IMAGE = ("dino", "clip_i", "clip_t")  # the metrics with a score per subject image


class SubjectScorer:
    """DINO, CLIP-I and CLIP-T (and optionally PRES and DIV) of renders of one subject.

    Args:
        dino: The DINO encoder (DINO and PRES, and DIV with ``div="dino"``).
        clip: The CLIP encoder (CLIP-I and CLIP-T).
        references: The subject's real images, float in [0, 1]: (N, 3, H, W) or a sequence of (3, H, W).
        identifier: The rare token, removed from prompts before CLIP-T.
        pres: Score renders of the bare class prompt against the real images (PRES, lower is better).
        div: Mean pairwise distance among renders of one prompt: ``lpips`` (the protocol), ``dino`` (offline), or
            None to skip it.
    """

    def __init__(
        self,
        dino: ImageEncoder,
        clip: ClipEncoder,
        references: Tensor | Sequence[Tensor],
        identifier: str,
        pres: bool = True,
        div: Literal["lpips", "dino"] | None = None,
    ) -> None:
        self.identifier = identifier
        self.metrics = {"dino": SubjectFidelity(dino, references), "clip_i": SubjectFidelity(clip, references)}
        self.metrics["clip_t"] = PromptFidelity(clip)
        if pres:
            self.metrics["pres"] = PreservationScore(dino, references)
        if div:
            self.metrics["div"] = Diversity(div, encoder=dino if div == "dino" else None)

    @property
    def div_distance(self) -> str | None:
        """What DIV measures (e.g. ``lpips:alex``, ``1-cos:builtin:tiny-dino``); a report must say it."""
        return self.metrics["div"].distance_name if "div" in self.metrics else None

    def to(self, device: torch.device | str) -> SubjectScorer:
        self.metrics = {name: metric.to(device) for name, metric in self.metrics.items()}
        return self

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update(
        self, images: Tensor, prompts: Sequence[str], prompt_ids: Sequence[int], is_class: Sequence[bool]
    ) -> dict[str, Tensor]:
        """Score renders (N, 3, H, W) in [0, 1] with their prompts, prompt ids (DIV pairs images of one id) and
        class-prompt flags; return per-image ``dino`` / ``clip_i`` / ``clip_t`` (N,) on the CPU, NaN for class rows,
        and ``pres`` (N,), NaN for subject rows."""
        device = next(iter(self.metrics.values())).device
        images = images.to(device)
        is_class_t = torch.tensor(list(is_class), dtype=torch.bool, device=device)  # (N,)
        subject = images[~is_class_t]
        scores = {name: torch.full((len(images),), float("nan")) for name in PER_IMAGE}
        if len(subject):
            texts = [strip_identifier(p, self.identifier) for p, c in zip(prompts, is_class, strict=True) if not c]
            self.metrics["dino"].update(subject)
            self.metrics["clip_i"].update(subject)
            self.metrics["clip_t"].update(subject, texts)
            if "div" in self.metrics:
                self.metrics["div"].update(subject, torch.tensor(list(prompt_ids), device=device)[~is_class_t])
            for name in PER_IMAGE:
                scores[name][~is_class_t.cpu()] = self.metrics[name].last_per_image.float().cpu()
        if is_class_t.any() and "pres" in self.metrics:
            self.metrics["pres"].update(images[is_class_t])
            scores["pres"] = torch.full((len(images),), float("nan"))
            scores["pres"][is_class_t.cpu()] = self.metrics["pres"].last_per_image.float().cpu()
        return scores

    def compute(self) -> dict[str, float]:
        """The mean of each metric over everything seen (on all ranks: call it on every rank, in the same order)."""
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}


def mean_over_subjects(per_subject: dict[str, dict[str, float]]) -> dict[str, float]:
    """The protocol's average: per subject first (done), then the plain mean over subjects, per metric."""
    names = [n for n in METRIC_NAMES if any(n in scores for scores in per_subject.values())]
    return {n: sum(s[n] for s in per_subject.values() if n in s) / len(per_subject) for n in names}


def write_report(folder: str | Path, report: dict, image_rows: list[dict] | None = None) -> dict[str, Path]:
    """Write ``report.json`` (everything), ``report.csv`` (one row per subject, then ``mean``) and, when given,
    ``images.csv`` (one row per render). ``report`` holds ``subjects`` ({name: {class, live, images, <metrics>}}) and
    ``mean`` ({<metric>: value}) beside the settings. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "csv": folder / "report.csv"}
    atomic_write_text(paths["json"], json.dumps(_nan_to_none(report), indent=2, default=str, allow_nan=False) + "\n")
    metric_names = [n for n in METRIC_NAMES if n in report["mean"]]
    rows = [{"subject": name, **info} for name, info in report["subjects"].items()]
    rows.append({"subject": "mean", **report["mean"]})
    atomic_write_text(paths["csv"], _csv_text(["subject", "class", "live", "images", *metric_names], rows))
    if image_rows:
        paths["images"] = folder / "images.csv"
        atomic_write_text(paths["images"], _csv_text(list(image_rows[0]), image_rows))
    return paths


def _nan_to_none(value):
    """JSON has no NaN: a metric with nothing to average (e.g. DIV with one image per prompt) becomes null."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return value
