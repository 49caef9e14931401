"""Sequence parallelism of the DeepSpeed engine through DeepSpeed-Ulysses (`deepspeed.sequence.layer.
DistributedAttention`): `parallel.cp` ranks split each sample's sequence; around attention, DeepSpeed's
all-to-all turns [B, S/cp, heads] into [B, S, heads/cp] and back, and Loom's attention kernel runs in between with
the whole-sequence masks, positions and biases (the same seams as the native engine's Ulysses,
framework/parallel/context.py, which also shards the batch and gathers the ids).

Groups: ranks [g*cp, ..., g*cp + cp - 1] form sequence group g and read the same data-parallel slice. ZeRO still
partitions and reduces over every rank: sequence peers hold the same parameters, each with the gradient of its
own tokens, so DeepSpeed's average over all ranks (undone by the engine's loss factor) sums them exactly.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from framework.models.attention import AttendFn, AttentionContext
from framework.parallel.context import install_sequence_parallel, whole_sequence_context


def sequence_group(cp: int) -> dist.ProcessGroup:
    """This rank's sequence-parallel group (every rank creates every group, in the same order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, cp):
        group = dist.new_group(list(range(first, first + cp)))
        if first <= rank < first + cp:
            mine = group
    assert mine is not None  # internal: cp divides the world size (checked by check_deepspeed)
    return mine


def apply_deepspeed_ulysses(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Route every attention module of `model` through DeepSpeed's DistributedAttention over `group`."""
    layer = importlib.import_module("deepspeed.sequence.layer")
    install_sequence_parallel(model, group, 1, _Exchange(layer.DistributedAttention))


class _Exchange:
    """attend_hook(attend, q, k, v, ctx, group=...) with DeepSpeed's all-to-all: q/k/v arrive [B, heads, S/cp, D]
    (views of Loom's [B, S/cp, heads, D] projections), DeepSpeed wants [B, S/cp, heads, D] (batch_dim_idx 0,
    heads scattered from dim 2, sequence gathered on dim 1)."""

    def __init__(self, distributed_attention: type) -> None:
        self.distributed_attention = distributed_attention

    def __call__(self, attend: AttendFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: AttentionContext, *, group: dist.ProcessGroup) -> torch.Tensor:  # fmt: skip
        full = whole_sequence_context(ctx, group)

        def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), full)  # [B, heads/cp, S, D]
            return out.transpose(1, 2)

        exchange = self.distributed_attention(local, group, scatter_idx=2, gather_idx=1)
        out = exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
        return out.transpose(1, 2)
