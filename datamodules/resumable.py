"""A training data order that is a function of (seed, epoch) and can resume mid-epoch, Lightning-free.

A resumed run must see the same batches, with the same random flips and crops, as an uninterrupted one:

- :class:`ResumableSampler` shuffles with ``seed + epoch`` (as ``DistributedSampler`` does, so each rank takes its
  own shard and Lightning does not wrap it), pairs each index with a per-item seed, and can start a pass at a
  given position.
- :class:`SeededItems` runs each item's random transforms under that item's seed, inside a forked RNG: augmentations
  depend neither on the global RNG (which the model's noise draws use), nor on worker processes, nor on resuming.
- :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (the protocol Lightning
  uses to save and restore a loader's mid-epoch position in checkpoints): it counts its own passes (epochs) and
  batches, and its state is the epoch and the number of samples handed out in it over all ranks, so that a run can
  resume on another number of ranks: the new ranks share the rest of the epoch's order, each item once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.rng_state import cpu_seeded

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

    Yields ``(index, item_seed)`` pairs, for :class:`SeededItems`. Used alone it follows ``set_epoch`` like
    ``DistributedSampler``; driven by a :class:`ResumableDataLoader`, each pass uses the epoch and start position the
    loader gives it with :meth:`start_pass`, whatever ``set_epoch`` said (see the loader for why).

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
        self._pass: tuple[int, int] | None = None  # (epoch, start), set by the loader

    def start_pass(self, epoch: int, start: int = 0) -> None:
        """Make the following passes use ``epoch`` and start at position ``start`` of the epoch's order over all
        ranks (the number of items handed out so far by all ranks, whatever their number was)."""
        self._pass = (epoch, max(0, int(start)))

    def order(self, epoch: int, start: int = 0) -> list[int]:
        """This rank's indices in pass ``epoch`` from global position ``start``: those at positions start + rank,
        start + rank + R, ... of the order, the rest of the epoch padded by repetition (or cut, with ``drop_last``)
        to a multiple of R so that every rank gets as many items."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        rest = len(indices) - min(start, len(indices))  # items of the epoch not handed out yet
        if self.drop_last:
            end = start + rest - rest % self.num_replicas
        else:  # pad as DistributedSampler does: from the start of the order (the same padding when start is 0)
            end = start + rest + (-rest) % self.num_replicas
            padding = end - len(indices)
            if padding > 0:
                indices += (indices * (padding // len(indices) + 1))[:padding]
        return indices[start + self.rank : end : self.num_replicas]

    def __len__(self) -> int:
        # the whole epoch's share (Lightning counts an epoch's batches with it), also in a pass that resumes mid-epoch
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self._pass if self._pass is not None else (self.epoch, 0)
        for local, index in enumerate(self.order(epoch, start)):
            yield index, item_seed(self.seed, epoch, start + local * self.num_replicas + self.rank)


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is made with torch's CPU generator seeded by ``seed``, which is
    restored afterwards (the CUDA generators, which draw the training noise on a GPU, are not touched).

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
        with cpu_seeded(seed):
            return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that counts its own passes (epochs) and batches, and can save and restore both.

    The loader, not the caller's ``set_epoch``, decides the epoch of each pass: a pass becomes the current one when it
    hands out its first batch, and the next pass is the next epoch. (Lightning 2.6's epoch counters in a checkpoint
    written by a resumed run are off by one at an epoch's end, and a second resume from it calls ``set_epoch`` with
    the previous epoch; the loader's own count stays right.) ``state_dict()`` is the current pass's epoch and the
    samples handed out in it by all ranks (``samples_done_all_ranks``; every rank hands out as many batches, so the
    rank that saves the checkpoint knows it), counted as batches are returned (worker prefetching does not count);
    ``load_state_dict()`` makes the next pass continue from there, on any number of ranks. (Checkpoints written
    before this counted rank 0's samples, ``samples_done``: those resume on the number of ranks they were made on.)

    Args:
        epoch: Epoch of the first pass (the trainer's current epoch when the loader is made).
        args, kwargs: Those of ``DataLoader``.
    """

    def __init__(self, *args: Any, epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next = (epoch, 0)  # (epoch, samples handed out by all ranks before the next pass) of the next pass
        self._current: list[int] | None = None  # [epoch, start over all ranks, batches handed out] of the current pass

    @property
    def _replicas(self) -> int:
        return self.sampler.num_replicas if isinstance(self.sampler, DistributedSampler) else 1

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self._next
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.start_pass(epoch, start)
        return self._counted(super().__iter__(), epoch, start)

    def _counted(self, iterator: Iterator[Any], epoch: int, start: int) -> Iterator[Any]:
        current = None
        for batch in iterator:
            if current is None:  # the pass has begun: it is the current one, the next pass is the next epoch
                current = self._current = [epoch, start, 0]
                self._next = (epoch + 1, 0)
            current[2] += 1
            yield batch

    def _pass_batches(self, start: int) -> int:
        """Batches per rank in a pass that starts at global position ``start``."""
        if not isinstance(self.sampler, ResumableSampler):
            return len(self) - start // ((self.batch_size or 1) * self._replicas)
        items = len(self.sampler.order(0, start))  # the count does not depend on the epoch
        size = self.batch_size or 1
        return items // size if self.drop_last else -(-items // size)

    def state_dict(self) -> dict[str, int]:
        if self._current is None:  # no batch handed out since the loader was made or restored
            return {"epoch": self._next[0], "samples_done_all_ranks": self._next[1]}
        epoch, start, batches = self._current
        if isinstance(self.sampler, BucketBatchSampler):  # batches of unequal sizes: the sampler counts
            done, complete = self.sampler.progress(epoch, start, batches)
            return (
                {"epoch": epoch + 1, "samples_done_all_ranks": 0}
                if complete
                else {"epoch": epoch, "samples_done_all_ranks": done}
            )
        done = start + batches * (self.batch_size or 1) * self._replicas
        if batches >= self._pass_batches(start) or done >= len(self.dataset):  # complete: a new epoch from its start
            return {"epoch": epoch + 1, "samples_done_all_ranks": 0}
        return {"epoch": epoch, "samples_done_all_ranks": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "samples_done_all_ranks" in state:
            done = int(state["samples_done_all_ranks"])
        else:  # an older checkpoint: rank 0's count, on as many ranks as now
            done = int(state["samples_done"]) * self._replicas
        self._next = (int(state["epoch"]), done)
        self._current = None


class BucketBatchSampler(ResumableSampler):
    """Whole batches, each from one aspect-ratio bucket, in an order fixed by ``(seed, epoch)``, for one rank.

    An epoch's batches: each bucket's items shuffled and cut into batches of ``batch_size`` (its last one shorter),
    then all the batches shuffled together, from one generator seeded with ``seed + epoch``. Rank ``r`` of ``R``
    takes batches ``r, r + R, ...``; the tail is padded with the epoch's first batches so that every rank takes as
    many. Each item gets its item seed from its position in the epoch (over all ranks). A pass can start at any
    count of samples handed out by all ranks (the end of a batch), on any number of ranks: resuming on another world
    size shares the rest of the epoch's batches among the new ranks.

    Yields lists of ``(index, item_seed)`` (a DataLoader with ``batch_size=None`` hands each list to the dataset:
    see :class:`BatchedItems`). A ``DistributedSampler``, so that Lightning does not replace it under DDP.

    Args:
        dataset: The dataset (its length).
        bucket_ids: Each item's bucket.
        batch_size: Items per batch (at most).
        seed, num_replicas, rank: As for :class:`ResumableSampler`.
    """

    def __init__(
        self, dataset: Dataset, bucket_ids: Sequence[int], batch_size: int, seed: int = 0, num_replicas: int = 1,
        rank: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(dataset, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=True)
        if len(bucket_ids) != len(dataset):
            raise ValueError("BucketBatchSampler: one bucket id per item")
        self.bucket_ids, self.batch_size = list(bucket_ids), batch_size
        self.members = {b: [i for i, x in enumerate(self.bucket_ids) if x == b] for b in sorted(set(self.bucket_ids))}
        self.num_batches = sum(-(-len(m) // batch_size) for m in self.members.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches over all ranks, in order."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        out = []
        for members in self.members.values():
            shuffled = [members[k] for k in torch.randperm(len(members), generator=g).tolist()]
            out += [shuffled[k : k + self.batch_size] for k in range(0, len(shuffled), self.batch_size)]
        return [out[k] for k in torch.randperm(len(out), generator=g).tolist()]

    def _position(self, batches: list[list[int]], start: int) -> tuple[int, list[int]]:
        """The batch at which ``start`` samples are done, and the samples done before each batch."""
        done = [0]
        for batch in batches:
            done.append(done[-1] + len(batch))
        return min(bisect.bisect_left(done, start), len(batches)), done

    def order(self, epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:  # type: ignore[override]
        """This rank's batches of ``(index, item_seed)`` in pass ``epoch`` from ``start`` samples over all ranks."""
        batches = self.batches(epoch)
        p, done = self._position(batches, start)
        rest = batches[p:]
        rest += (batches * (len(rest) // max(len(batches), 1) + 1))[: (-len(rest)) % self.num_replicas]
        mine, position = [], done[p]
        for k, batch in enumerate(rest):
            if k % self.num_replicas == self.rank:
                mine.append([(i, item_seed(self.seed, epoch, position + j)) for j, i in enumerate(batch)])
            position += len(batch)
        return mine

    def progress(self, epoch: int, start: int, batches_done: int) -> tuple[int, bool]:
        """Samples done over all ranks after each rank handed out ``batches_done`` batches of a pass begun at
        ``start``, and whether the epoch is complete."""
        batches = self.batches(epoch)
        p, done = self._position(batches, start)
        q = p + batches_done * self.num_replicas
        return (done[-1], True) if q >= len(batches) else (done[q], False)

    def __len__(self) -> int:
        return -(-self.num_batches // self.num_replicas)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        epoch, start = self._pass if self._pass is not None else (self.epoch, 0)
        yield from self.order(epoch, start)


class BatchedItems(Dataset):
    """Wraps a dataset so that a list of keys (a whole batch from :class:`BucketBatchSampler`) gives their items."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, keys: list) -> list:
        return [self.dataset[k] for k in keys]


def resumable_bucket_loader(
    dataset: Dataset,
    bucket_ids: Sequence[int],
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    epoch: int = 0,
    **kwargs: Any,
) -> ResumableDataLoader:
    """The training loader with aspect-ratio buckets: every batch from one bucket (:class:`BucketBatchSampler`),
    seeded items, resumable mid-epoch as :func:`resumable_train_loader`."""
    sampler = BucketBatchSampler(dataset, bucket_ids, batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
    return ResumableDataLoader(
        BatchedItems(SeededItems(dataset)),
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        epoch=epoch,
        **kwargs,
    )


def resumable_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    epoch: int = 0,
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
        epoch=epoch,
        **kwargs,
    )
