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
    assert len(loader) == 4 and loader.state_dict() == {"epoch": 0, "samples_done_all_ranks": 0}
    it = iter(loader)
    next(it)
    next(it)
    assert loader.state_dict() == {"epoch": 0, "samples_done_all_ranks": 6}
    list(it)
    assert loader.state_dict() == {"epoch": 1, "samples_done_all_ranks": 0}  # a complete pass: the next epoch starts


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
    assert loader.state_dict() == {"epoch": 2, "samples_done_all_ranks": 0}
    assert _loader(epoch=1).state_dict() == {"epoch": 1, "samples_done_all_ranks": 0}  # made in a later epoch


def test_a_resumed_loader_continues_with_the_same_batches():
    full = list(_loader())
    torch.manual_seed(7)  # the global RNG plays no part
    fresh = _loader()
    fresh.load_state_dict({"epoch": 0, "samples_done_all_ranks": 6})
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


class TwelveItems(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.tensor([float(i), torch.rand(()).item()])


def _world(ranks: int, state: dict | None = None, batch_size: int = 1) -> list[list[torch.Tensor]]:
    """Each rank's batches of one pass, on a world of ``ranks`` ranks, resumed from ``state``."""
    batches = []
    for rank in range(ranks):
        loader = resumable_train_loader(TwelveItems(), batch_size=batch_size, seed=0, num_replicas=ranks, rank=rank)
        if state is not None:
            loader.load_state_dict(state)
        batches.append(list(loader))
    return batches


def _interrupted(ranks: int, batches: int, batch_size: int = 1) -> tuple[list[torch.Tensor], dict]:
    """The items that ``ranks`` ranks handed out in their first ``batches`` batches, and rank 0's loader state."""
    seen, state = [], None
    for rank in range(ranks):
        loader = resumable_train_loader(TwelveItems(), batch_size=batch_size, seed=0, num_replicas=ranks, rank=rank)
        it = iter(loader)
        seen += [next(it) for _ in range(batches)]
        if rank == 0:
            state = loader.state_dict()
    return seen, state


def _rows(batches) -> dict[int, torch.Tensor]:
    """item index -> the item (its random draw shows the item seed it was made with), each index once."""
    rows = [row for batch in batches for row in batch]
    indices = [int(row[0]) for row in rows]
    assert len(indices) == len(set(indices)), f"an item was seen twice: {sorted(indices)}"
    return {int(row[0]): row for row in rows}


def test_a_run_resumes_on_another_number_of_ranks_and_sees_every_item_of_the_epoch_once():
    """12 items, 2 ranks, interrupted after 2 batches each (4 items): on 4 ranks, then on 1, and on 3 (which does not
    divide the 8 left), the rest of the epoch is the 8 other items, each once, made with the same item seeds as in an
    uninterrupted run; every rank runs as many batches (what DDP's collectives need)."""
    uninterrupted = _rows([b for rank in _world(2) for b in rank])
    assert sorted(uninterrupted) == list(range(12))
    seen, state = _interrupted(2, batches=2)
    assert state == {"epoch": 0, "samples_done_all_ranks": 4}  # over all ranks, not rank 0's 2
    before = _rows(seen)
    for ranks in (4, 1, 3, 2):
        per_rank = _world(ranks, state)
        assert len({len(batches) for batches in per_rank}) == 1  # the same number of steps on every rank
        if ranks == 3:  # 8 items on 3 ranks: 9 places, the last (rank 2's last) padded with an item seen before
            assert int(per_rank[2][-1][0][0]) in before
            per_rank[2] = per_rank[2][:-1]
        rest = _rows([b for batches in per_rank for b in batches])
        assert sorted(set(rest) | set(before)) == list(range(12)) and not set(rest) & set(before), ranks
        assert all(torch.equal(rest[i], uninterrupted[i]) for i in rest), ranks  # same augmentation seeds


def test_resuming_on_the_same_ranks_gives_the_same_batches_as_before():
    """2 ranks, batches of 2: the resumed ranks continue with exactly the batches the uninterrupted ranks had."""
    full = _world(2, batch_size=2)
    _, state = _interrupted(2, batches=1, batch_size=2)
    resumed = _world(2, state, batch_size=2)
    for rank in range(2):
        assert len(resumed[rank]) == 2
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank], full[rank][1:], strict=True))


def test_a_checkpoint_that_counted_rank_0s_samples_resumes_on_as_many_ranks():
    full = _world(2)
    resumed = _world(2, {"epoch": 0, "samples_done": 2})  # written before the count was over all ranks
    assert all(torch.equal(a, b) for r in range(2) for a, b in zip(resumed[r], full[r][2:], strict=True))
