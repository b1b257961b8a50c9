"""Validation data: the prompts to render, each with a fixed seed. Validation is generation, so no images here."""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

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


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r takes prompts r, r + W, r + 2W, ...: every prompt is rendered exactly once across the W ranks.

    Lightning's default distributed sampler pads ranks to equal length with repeated prompts, which would count
    those prompts twice in the metrics and the grid.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def validation_sampler(dataset: Dataset) -> DistributedSampler | None:
    """The unpadded sampler under an initialized process group of several ranks; None (in order) otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(dataset)
    return None
