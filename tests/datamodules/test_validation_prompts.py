"""Validation prompts: templates, seeds, and spreading prompts across ranks without repeats."""

import pytest
from torch.utils.data import DataLoader

from datamodules.prompts import DREAMBENCH_LIVE_PROMPTS, DREAMBENCH_OBJECT_PROMPTS, fill, resolve_templates
from datamodules.validation import (
    PaddedItems,
    PaddedPromptSampler,
    ValidationPromptDataset,
    collate_prompts,
    marking_padding,
)


def test_dreambench_sets_hold_the_25_prompts():
    assert len(DREAMBENCH_OBJECT_PROMPTS) == len(DREAMBENCH_LIVE_PROMPTS) == 25
    assert fill(DREAMBENCH_LIVE_PROMPTS[10], "sks", "dog") == "a sks dog wearing a red hat"
    assert resolve_templates("dreambench_object")[0] == "a {identifier} {class_noun} in the jungle"


def test_unknown_placeholder_or_set_is_named():
    with pytest.raises(ValueError, match=r"\{identifer\}"):
        resolve_templates(["a {identifer} dog"])
    with pytest.raises(ValueError, match="dreambench_people"):
        resolve_templates("dreambench_people")


def test_dataset_fills_prompts_with_fixed_seeds_and_a_class_prompt():
    ds = ValidationPromptDataset(["a {identifier} {class_noun}", "a red {identifier} {class_noun}"], "sks", "dog",
                                 "a {class_noun}", seed=10)  # fmt: skip
    batch = collate_prompts([ds[i] for i in range(len(ds))])
    assert batch["prompts"] == ["a sks dog", "a red sks dog", "a dog"]
    assert batch["prompt_seed"].tolist() == [10, 11, 12]
    assert batch["is_class_prompt"].tolist() == [False, False, True]


@pytest.mark.parametrize("n, world", [(5, 2), (25, 4), (3, 4), (1, 2), (5, 16)])
def test_ranks_render_every_prompt_exactly_once_in_as_many_steps(n, world):
    """Fewer prompts than ranks included (the PRES prompt alone on 2 ranks; 5 prompts on 16): every rank runs the
    same steps with the same batch sizes, and every prompt is rendered once when the padding is dropped."""
    ds = ValidationPromptDataset([f"{{identifier}} {i}" for i in range(n - 1)], "sks", "dog", "a {class_noun}")
    assert len(ds) == n
    seen, steps = [], set()
    for rank in range(world):
        sampler = PaddedPromptSampler(ds, num_replicas=world, rank=rank)
        loader = DataLoader(PaddedItems(ds), 2, sampler=sampler, collate_fn=marking_padding(collate_prompts))
        batches = list(loader)
        steps.add(tuple(len(batch["prompts"]) for batch in batches))
        assert len(loader) == len(batches) > 0  # no rank with an empty loader
        seen += [int(i) for b in batches for i, pad in zip(b["prompt_index"], b["is_padding"], strict=True) if not pad]
    assert len(steps) == 1
    assert sorted(seen) == list(range(n))


def test_a_steps_renders_of_padding_prompts_are_dropped():
    import torch

    from lightning_modules.dreambooth import without_padding

    out = {"images": torch.arange(6).view(6, 1, 1, 1), "prompts": list("aabbcc"), "prompt_index": [0, 0, 1, 1, 0, 0]}
    batch = {"is_padding": torch.tensor([False, False, True])}  # 3 prompts, 2 images each, the last a repeat
    kept = without_padding(out, batch)
    assert kept["prompts"] == list("aabb") and kept["images"].flatten().tolist() == [0, 1, 2, 3]
    assert without_padding(out, {"is_padding": torch.tensor([True, True, True])}) is None
    assert without_padding(out, {}) is out  # one process: no padding, the outputs as they were
