"""The training data order: a function of (seed, epoch), sharded per rank, seeded per item, resumable mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from datamodules.resumable import ResumableDataLoader, ResumableSampler, SeededItems, resumable_train_loader


class RandomItems(Dataset):
    """Item i is (i, a random draw): the draw shows which RNG state the item was made under."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.tensor([float(i), torch.rand(()).item()])


def _indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(RandomItems(), seed=3), ResumableSampler(RandomItems(), seed=3)
    assert _indices(a) == _indices(b) and sorted(_indices(a)) == list(range(10))
    a.set_epoch(1)
    assert _indices(a) != _indices(b)  # a new order each epoch
    b.set_epoch(1)
    assert list(a) == list(b)  # indices and item seeds
    assert _indices(ResumableSampler(RandomItems(), seed=4)) != _indices(ResumableSampler(RandomItems(), seed=3))
    assert len({seed for _, seed in a}) == 10  # one seed per item


def test_ranks_take_disjoint_shards():
    shards = [_indices(ResumableSampler(RandomItems(), seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(10)) and len(shards[0]) == 5


def test_a_pass_can_start_mid_epoch_whatever_set_epoch_says():
    full = ResumableSampler(RandomItems(), seed=0)
    full.set_epoch(2)
    driven = ResumableSampler(RandomItems(), seed=0)
    driven.start_pass(epoch=2, start=4)
    driven.set_epoch(1)  # ignored while a loader drives the sampler
    assert list(driven) == list(full)[4:]


def test_seeded_items_do_not_depend_on_the_global_rng():
    items = SeededItems(RandomItems())
    torch.manual_seed(0)
    first = items[(1, 123)]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    assert torch.equal(items[(1, 123)], first)
    assert not torch.equal(items[(1, 124)], first)
    torch.manual_seed(0)
    items[(2, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    assert items[3][0] == 3  # plain indices pass through


def _loader(**kwargs) -> ResumableDataLoader:
    return resumable_train_loader(RandomItems(), batch_size=3, seed=0, **kwargs)


def test_loader_state_says_how_many_batches_were_handed_out():
    loader = _loader()
    assert len(loader) == 4 and loader.state_dict() == {"epoch": 0, "samples_done": 0}
    it = iter(loader)
    next(it)
    next(it)
    assert loader.state_dict() == {"epoch": 0, "samples_done": 6}
    list(it)
    assert loader.state_dict() == {"epoch": 1, "samples_done": 0}  # a complete pass: the next epoch starts


def test_the_loader_counts_its_own_epochs():
    loader = _loader()
    first = list(loader)
    loader.sampler.set_epoch(0)  # a caller's set_epoch does not decide the epoch
    iter(loader)  # an iterator that hands out nothing does not start a pass
    second = list(loader)
    reference = ResumableSampler(RandomItems(), seed=0)
    reference.set_epoch(1)
    assert [int(i) for b in second for i in b[:, 0]] == [i for i, _ in reference]
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert loader.state_dict() == {"epoch": 2, "samples_done": 0}
    assert _loader(epoch=1).state_dict() == {"epoch": 1, "samples_done": 0}  # made in a later epoch


def test_a_resumed_loader_continues_with_the_same_batches():
    full = list(_loader())
    torch.manual_seed(7)  # the global RNG plays no part
    fresh = _loader()
    fresh.load_state_dict({"epoch": 0, "samples_done": 6})
    rest = list(fresh)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


def test_workers_give_the_same_batches_as_the_main_process():
    in_process = list(_loader())
    with_workers = list(_loader(num_workers=1))
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))


def test_items_leave_every_generator_as_it_was(monkeypatch):
    """An item's seed reaches the CPU generator only, which is restored afterwards. (``torch.manual_seed`` also reseeds
    every CUDA generator, which nothing restores: with num_workers 0 on a GPU, the training noise would then follow
    the last item loaded instead of ``seed_everything``.) Recorded calls stand in for the GPU this machine lacks."""
    reseeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, name=name: reseeded.append((name, args)))
    items = SeededItems(RandomItems())
    torch.manual_seed(0)
    reseeded.clear()
    before = torch.get_rng_state()
    first, again = items[(3, 1234)], items[(3, 1234)]
    assert torch.equal(first, again)  # the item's draw follows its seed...
    assert reseeded == []  # ...which reached no CUDA generator
    assert torch.equal(torch.get_rng_state(), before)  # and the CPU generator is as it was
