"""Validation data: the prompts to render, each with a fixed seed. Validation is generation, so no images here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.prompts import fill


class ValidationBatch(TypedDict):
    """P prompts to render; the module renders ``num_images_per_prompt`` images for each."""

    prompts: list[str]  # (P,) filled prompts
    prompt_index: Tensor  # (P,) long: row of the prompt in the grid
    prompt_seed: Tensor  # (P,) long: fixed per prompt, so grids at different steps compare
    is_class_prompt: Tensor  # (P,) bool: the bare class prompt (for PRES), not a subject prompt


class ValidationPromptDataset(Dataset):
    """Subject prompts filled from templates, then (optionally) the bare class prompt used for PRES.

    Args:
        templates: Prompt templates with ``{identifier}`` and ``{class_noun}``.
        identifier: The rare token of the subject, e.g. ``sks``.
        class_noun: The subject's class, e.g. ``dog``.
        class_prompt_template: Template of the bare class prompt (e.g. ``"a {class_noun}"``), or None for none.
        seed: Base seed; prompt ``i`` renders with seed ``seed + i``.
    """

    def __init__(
        self,
        templates: list[str],
        identifier: str,
        class_noun: str,
        class_prompt_template: str | None = None,
        seed: int = 0,
    ) -> None:
        rows = [(fill(t, identifier, class_noun), False) for t in templates]
        if class_prompt_template:
            rows.append((fill(class_prompt_template, identifier, class_noun), True))
        self.rows = rows
        self.seed = seed
        self.concept_of = [0] * len(rows)  # each row's concept (data.concepts), by prompt index

    @classmethod
    def of_concepts(
        cls, templates: list[str], concepts: list[tuple[str, str]], class_prompt_template: str | None, seed: int = 0
    ) -> ValidationPromptDataset:
        """The rows of each concept's (identifier, class noun) in turn (prompt index and seed run on over them);
        one concept gives exactly the plain dataset's rows."""
        parts = [cls(templates, identifier, noun, class_prompt_template, seed) for identifier, noun in concepts]
        out = parts[0]
        out.concept_of = [k for k, part in enumerate(parts) for _ in part.rows]
        out.rows = [row for part in parts for row in part.rows]
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        prompt, is_class = self.rows[i]
        return {"prompt": prompt, "prompt_index": i, "prompt_seed": self.seed + i, "is_class_prompt": is_class}


def collate_prompts(items: list[dict]) -> ValidationBatch:
    return ValidationBatch(
        prompts=[it["prompt"] for it in items],
        prompt_index=torch.tensor([it["prompt_index"] for it in items], dtype=torch.long),
        prompt_seed=torch.tensor([it["prompt_seed"] for it in items], dtype=torch.long),
        is_class_prompt=torch.tensor([it["is_class_prompt"] for it in items], dtype=torch.bool),
    )


class PaddedPromptSampler(DistributedSampler):
    """Rank r takes prompts r, r + W, r + 2W, ... and every rank as many: positions past the last prompt are padding.

    Every rank must run the same steps with the same batch sizes: a rank with no prompt would make Lightning refuse
    its empty loader, or leave the others waiting in the grid's gather, and under FSDP every UNet forward is a
    collective. So the last round is padded to W with indices ``len(dataset)`` and up, which :class:`PaddedItems`
    turns into repeats of the first prompts marked as padding: they are rendered like the others and dropped from the
    step's outputs (see ``DreamBoothModule``), so every prompt is rendered, scored and shown exactly once across the
    W ranks (Lightning's own distributed sampler pads with unmarked repeats, which the metrics would count twice).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples  # ceil(len(dataset) / W) on every rank


class PaddedItems(Dataset):
    """``(item, is_padding)`` for index i of ``dataset``; past its end, a repeat marked as padding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, bool]:
        return self.dataset[i % len(self.dataset)], i >= len(self.dataset)


class marking_padding:  # noqa: N801 - used as a function; a class so that worker processes can pickle it
    """``collate`` over the items of ``(item, is_padding)`` pairs, with ``is_padding`` ((P,) bool) added to the batch."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[Any, bool]]) -> Any:
        batch = self.collate([item for item, _ in pairs])
        batch["is_padding"] = torch.tensor([padding for _, padding in pairs], dtype=torch.bool)
        return batch


def prompt_loader(dataset: Dataset, batch_size: int, collate: Callable[[list], Any]) -> DataLoader:
    """Prompts in order; under a process group of several ranks, spread over them with padding (see above)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sampler = PaddedPromptSampler(dataset)
        return DataLoader(
            PaddedItems(dataset), batch_size=batch_size, sampler=sampler, collate_fn=marking_padding(collate)
        )
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
