"""Validation prompts: templates, seeds, and spreading prompts across ranks without repeats."""

import pytest

from datamodules.prompts import DREAMBENCH_LIVE_PROMPTS, DREAMBENCH_OBJECT_PROMPTS, fill, resolve_templates
from datamodules.validation import UnpaddedDistributedSampler, ValidationPromptDataset, collate_prompts


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


@pytest.mark.parametrize("n, world", [(5, 2), (25, 4), (3, 4)])
def test_ranks_render_every_prompt_exactly_once(n, world):
    ds = list(range(n))
    seen = []
    for rank in range(world):
        sampler = UnpaddedDistributedSampler.__new__(UnpaddedDistributedSampler)
        sampler.dataset, sampler.rank, sampler.num_replicas = ds, rank, world
        seen += list(sampler)
        assert len(sampler) == len(list(sampler))
    assert sorted(seen) == ds
