"""Collecting per-rank Python objects (validation records) on every rank, Lightning-free."""

from __future__ import annotations

import torch.distributed as dist


def all_gather_list(items: list) -> list:
    """Concatenate every rank's list, in rank order; the local list when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
