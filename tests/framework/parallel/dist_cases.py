"""Functions the distributed tests run on every rank of a `DistPool` (by import path 'dist_cases:name')."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_sum() -> tuple[int, float]:
    """(rank, sum of ranks over the group): proves the group works."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank one failed on purpose")
    return dist.get_rank()
