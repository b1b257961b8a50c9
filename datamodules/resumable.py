"""A training data order that is a function of (seed, epoch) and can resume mid-epoch, Lightning-free.

A resumed run must see the same batches, with the same random flips and crops, as an uninterrupted one:

- :class:`ResumableSampler` shuffles with ``seed + epoch`` (as ``DistributedSampler`` does, so each rank takes its
  own shard and Lightning does not wrap it), pairs each index with a per-item seed, and can start a pass at a
  given position.
- :class:`SeededItems` runs each item's random transforms under that item's seed, inside a forked RNG: augmentations
  depend neither on the global RNG (which the model's noise draws use), nor on worker processes, nor on resuming.
- :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (the protocol Lightning
  uses to save and restore a loader's mid-epoch position in checkpoints): its state is the epoch and the number of
  batches it has handed out in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_MASK63 = (1 << 63) - 1


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the item at ``position`` (over all ranks) in pass ``epoch``: distinct per item, epoch and seed."""
    # splitmix64-style mixing: nearby inputs give unrelated seeds.
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


class ResumableSampler(DistributedSampler):
    """Shuffled indices of ``dataset`` for one rank, in an order fixed by ``(seed, epoch)``, each with an item seed.

    Yields ``(index, item_seed)`` pairs, for :class:`SeededItems`. After :meth:`resume`, the next pass over the
    epoch it names starts at ``start`` (this rank's position), as if the first ``start`` items had been seen.

    Args:
        dataset: The dataset (only its length is used).
        seed: Seed of the order and of the item seeds.
        num_replicas: Number of ranks; each gets ``ceil(len / num_replicas)`` items (padded by repetition).
        rank: This process's rank.
        shuffle: Shuffle (training); ``False`` keeps the dataset order.
        drop_last: Drop the tail instead of padding so that every rank gets the same number of items.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._resume_epoch: int | None = None
        self._resume_start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._resume_epoch is not None and epoch != self._resume_epoch:
            self._resume_epoch = None  # a resume position is only valid for the epoch it was saved in

    def resume(self, epoch: int, start: int) -> None:
        """Make the next pass over ``epoch`` start at this rank's position ``start``."""
        self.set_epoch(epoch)
        self._resume_epoch, self._resume_start = epoch, max(0, int(start))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # this rank's shard: positions rank, rank + R, rank + 2R, ... overall
        start = self._resume_start if self._resume_epoch == self.epoch else 0
        for local, index in enumerate(indices[start:], start=start):
            yield index, item_seed(self.seed, self.epoch, local * self.num_replicas + self.rank)


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is made under ``torch.manual_seed(seed)``, in a forked RNG.

    Plain integer indices pass through unchanged (e.g. when Lightning swaps in a sequential sampler).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the current epoch can be saved and restored.

    ``state_dict()`` says how many batches this loader has handed out in its current pass (counted as they are
    returned, so worker prefetching does not count); ``load_state_dict()`` makes the next pass continue from there,
    when the sampler is a :class:`ResumableSampler`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        self._epoch = getattr(sampler, "epoch", 0)
        resumed = getattr(sampler, "_resume_epoch", None) == self._epoch
        start = getattr(sampler, "_resume_start", 0) if resumed else 0
        self._batches_done = start // self.batch_size if self.batch_size else 0
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self._batches_done >= len(self):  # the pass is complete: the next one is a new epoch from its start
            return {"epoch": self._epoch + 1, "samples_done": 0}
        return {"epoch": self._epoch, "samples_done": self._batches_done * (self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.resume(int(state["epoch"]), int(state["samples_done"]))
            self._epoch = int(state["epoch"])


def resumable_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    **kwargs: Any,
) -> ResumableDataLoader:
    """The training loader: shuffled by ``(seed, epoch)``, one shard per rank, seeded items, resumable mid-epoch.

    ``kwargs`` go to the ``DataLoader`` (``collate_fn``, ``drop_last``, ...). The loader's own generator (for the
    workers' base seed) is seeded too, so creating an iterator never draws from the global RNG.
    """
    sampler = ResumableSampler(dataset, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=True)
    return ResumableDataLoader(
        SeededItems(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
