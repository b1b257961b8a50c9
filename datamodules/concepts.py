"""Several subjects (concepts) in one run, Lightning-free: ``data.concepts``, each with its photos, prompt, class
images and repeat count.

One concept is what the plain options (``data.instance_data_dir``, ``data.instance_prompt``, ``data.class_*``) have
always described; ``data.concepts`` lists several. A concept's unset fields fall back to the plain options
(``data.identifier``, ``data.class_noun``, ``data.class_data_dir``, ``data.class_prompt``, ``data.num_class_images``),
so two dogs can share one folder of class images. Training draws every concept's items in one shuffled order, each
concept's ``repeats`` times per epoch; validation renders each concept's prompts with its own identifier and scores
them against its own photos (``val/dino/<name>``; ``val/dino`` is the mean over concepts); ``test`` evaluates each
concept against its own photos.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from core.errors import ConfigError


@dataclass
class Concept:
    """One subject of ``data.concepts``.

    Args:
        instance_data_dir: Folder of this subject's photos (captions and masks beside them, as for the plain option).
        instance_prompt: Caption of its photos (those without their own), with its identifier: ``a photo of zwx cat``.
        name: Its name in metrics (``val/dino/<name>``) and reports; default: the folder's name.
        identifier: Its rare token, e.g. ``zwx``; default ``data.identifier``.
        class_noun: Its class noun in validation prompts; default ``data.class_noun``, else the words after the
            identifier in ``instance_prompt``.
        class_data_dir: Its class images (prior preservation); default ``data.class_data_dir``.
        class_prompt: Prompt of its class images; default ``data.class_prompt``.
        num_class_images: How many class images it trains with; default ``data.num_class_images``.
        repeats: How often each of its photos appears per epoch (balance a subject of few photos).
    """

    instance_data_dir: str
    instance_prompt: str
    name: str | None = None
    identifier: str | None = None
    class_noun: str | None = None
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int | None = None
    repeats: int = 1


@dataclass(frozen=True)
class ResolvedConcept:
    """A concept with every field decided (the plain options filled in); ``option`` names it in messages."""

    name: str
    instance_data_dir: str
    instance_prompt: str
    identifier: str
    class_noun: str | None
    class_data_dir: str | None
    class_prompt: str | None
    num_class_images: int
    repeats: int
    option: str


def as_dicts(concepts: list[Concept | dict] | None) -> list[dict] | None:
    """Plain dicts (what hyperparameters and checkpoints keep)."""
    if concepts is None:
        return None
    return [asdict(c) if isinstance(c, Concept) else dict(c) for c in concepts]


def resolve_concepts(concepts: list[dict] | None, plain: dict[str, Any], with_prior: bool) -> list[ResolvedConcept]:
    """The run's concepts: ``data.concepts`` with the plain options as defaults, or the plain options as one."""
    fields = ("identifier", "class_noun", "class_data_dir", "class_prompt", "num_class_images")
    if concepts is None:
        if not plain.get("instance_data_dir") or not (plain.get("instance_prompt") or "").strip():
            raise ConfigError(
                "Give data.instance_data_dir and data.instance_prompt (the subject's photos and caption, e.g. 'a photo "
                "of sks dog'), or data.concepts (several subjects)."
            )
        folder = Path(plain["instance_data_dir"]).expanduser()
        one = {"instance_data_dir": plain["instance_data_dir"], "instance_prompt": plain["instance_prompt"]}
        return [
            ResolvedConcept(
                name=folder.name or "subject", **one, **{f: plain[f] for f in fields}, repeats=1, option="data"
            )
        ]
    if not concepts:
        raise ConfigError("data.concepts is an empty list: list the subjects, or leave it null for the plain options.")
    if plain.get("instance_data_dir") or plain.get("instance_prompt"):
        raise ConfigError(
            "Give data.concepts or data.instance_data_dir / data.instance_prompt, not both (set the plain ones to null "
            "when listing concepts; configs/examples/concepts.yaml does)."
        )
    out = []
    for k, raw in enumerate(concepts):
        c = Concept(**raw)
        option = f"data.concepts[{k}]"
        if not c.instance_data_dir or not c.instance_prompt.strip():
            raise ConfigError(f"{option}: instance_data_dir and instance_prompt must be given and not empty.")
        if c.repeats < 1:
            raise ConfigError(f"{option}.repeats must be at least 1, got {c.repeats}.")
        values = {f: getattr(c, f) if getattr(c, f) is not None else plain[f] for f in fields}
        if with_prior and not (values["class_data_dir"] and values["class_prompt"]):
            raise ConfigError(
                f"{option}: prior preservation needs its class_data_dir and class_prompt (or data.class_data_dir and "
                "data.class_prompt for all), or set data.with_prior_preservation false."
            )
        if with_prior and values["num_class_images"] <= 0:
            raise ConfigError(f"{option}.num_class_images must be positive, got {values['num_class_images']}.")
        name = c.name or Path(c.instance_data_dir).expanduser().name
        out.append(
            ResolvedConcept(name, c.instance_data_dir, c.instance_prompt, **values, repeats=c.repeats, option=option)
        )
    names = [c.name for c in out]
    for name in names:
        if names.count(name) > 1 or not name or "/" in name:
            raise ConfigError(
                f"data.concepts: the name {name!r} is {'empty or has a /' if names.count(name) == 1 else 'repeated'}; "
                "each concept needs its own name (set name:, which metrics show as val/dino/<name>)."
            )
    identifiers = [c.identifier for c in out]
    if len(out) > 1 and len(set(identifiers)) == 1:
        raise ConfigError(
            f"data.concepts: every concept has the identifier {identifiers[0]!r}; give each its own (identifier: and "
            "in its instance_prompt), or their prompts cannot tell the subjects apart."
        )
    return out


class ConceptsDataset(Dataset):
    """The items of several concepts' datasets in one index, each concept's ``repeats`` times over.

    With aspect-ratio buckets (every part has ``buckets`` and ``bucket_ids``), ``bucket_ids`` numbers the buckets of
    all the parts together, by size, so that a batch holds one size whichever concepts it mixes.
    """

    def __init__(self, parts: list[Dataset], repeats: list[int]) -> None:
        self.parts, self.repeats = parts, repeats
        self.ends = []
        total = 0
        for part, r in zip(parts, repeats, strict=True):
            total += len(part) * r
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Item ``index`` -> (concept, index in its dataset)."""
        k = bisect.bisect_right(self.ends, index)
        start = self.ends[k - 1] if k else 0
        return k, (index - start) % len(self.parts[k])

    def __getitem__(self, index: int) -> Any:
        k, i = self.locate(index)
        return self.parts[k][i]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return sorted({b for part in self.parts for b in part.buckets})

    @property
    def bucket_ids(self) -> list[int]:
        sizes = self.buckets
        ids = []
        for part, r in zip(self.parts, self.repeats, strict=True):
            ids += [sizes.index(part.buckets[b]) for b in part.bucket_ids] * r
        return ids
