"""Dropout randomness in a multi-process run: which ranks draw the same masks and which draw their own.

Dropout draws from torch's default generators (CPU, and CUDA on GPU; SDPA's dropout takes no generator argument,
so the default generator is the only handle there is). The scheme:

* Every rank seeds its default generators with `seed_for_rank(train.seed, mesh)`: the seed mixed with the rank's
  data-parallel index (over dp_replicate x dp_shard), its pipeline stage and its context-parallel index, and NOT
  its tensor-parallel index.
  - Different data-parallel ranks hold different samples: their masks must be independent. (Seeding every rank
    with train.seed gave every dp rank the same masks: the same units dropped in every replica.)
  - Pipeline stages hold different layers, and context-parallel ranks different tokens of the same sequence:
    nothing is replicated across them, so they draw independently too.
  - Tensor-parallel peers hold the SAME replicated activations (embedding output, the residual stream after the
    row-parallel all-reduce): their masks must be identical or the replicas silently diverge. Same seed, and the
    same sequence of draws (each tp rank draws as many numbers as its peers), keeps them identical.
* Attention-probability dropout under tensor parallelism acts on this rank's heads only, so its masks must differ
  per tp rank (as Megatron's model-parallel RNG tracker makes them). With sequence parallelism the blocks'
  residual dropout acts on this rank's sequence shard: its own masks per tp rank too (the embedding dropout still
  sees the whole, replicated sequence: identical masks). `fork_tp_dropout` wraps the forward of each such module (parallel code changes modules in place; framework/models stays free of
  torch.distributed): it draws one number from the default generator (the same on every tp peer), seeds a forked
  generator state with that number mixed with the tp rank, runs the forward (everything in it acts on this
  rank's shard), and restores the default state, so the replicated draws that follow stay in step across peers.
  Because the fork's seed comes from the default CPU generator, activation checkpointing, which restores the
  default generators before recomputing, recomputes the same attention masks.
* One process: `train.seed` itself (unchanged single-process runs).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.models.attention import Attention

_SEED_BITS = 63


def mix_seed(seed: int, *indices: int) -> int:
    """A stable 63-bit seed from `seed` and rank indices (a hash: adjacent seeds or ranks never collide the way
    seed + rank would, where run seed 1 rank 0 equals run seed 0 rank 1)."""
    text = ":".join(str(i) for i in (seed, *indices))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def seed_for_rank(seed: int, mesh: DeviceMesh | None) -> int:
    """The seed of this rank's default generators (see the module docstring): mixed with the data-parallel,
    pipeline and context-parallel indices, identical across tensor-parallel peers. No mesh: `seed`."""
    if mesh is None:
        return seed
    names = mesh.mesh_dim_names or ()
    index = {name: mesh[name].get_local_rank() if name in names else 0 for name in _MIXED}
    dp = index["dp_replicate"] * _size(mesh, "dp_shard") + index["dp_shard"]
    return mix_seed(seed, dp, index["pp"], index["cp"])


_MIXED = ("dp_replicate", "dp_shard", "pp", "cp")


def _size(mesh: DeviceMesh, name: str) -> int:
    return mesh[name].size() if name in (mesh.mesh_dim_names or ()) else 1


@contextlib.contextmanager
def per_rank_rng(rank: int, device: torch.device) -> Iterator[None]:
    """Run the body on default generators forked and seeded for `rank`; the default states are restored after.

    The fork's seed is one draw from the default CPU generator, so peers that share that generator's state draw
    the same number (and stay in step), while each rank's body sees its own stream."""
    base = int(torch.randint(0, 2**62, ()).item())
    devices = (
        []
        if device.type != "cuda"
        else [torch.cuda.current_device() if device.index is None else device.index]
    )
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(mix_seed(base, rank))
        yield


def fork_rng_per_tp_rank(module: nn.Module, tp_rank: int) -> None:
    """Make `module`'s forward draw its randomness from a stream of its own per tp rank (see per_rank_rng).
    For modules whose every random draw acts on tp-sharded data (attention over this rank's heads). The forward
    is wrapped on the instance, so parameter names do not change."""
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        # the input's device: Dropout has no parameters (and an input may be a DTensor: .device is its local one)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with per_rank_rng(tp_rank, device):
            return forward(*args, **kwargs)

    module.forward = wrapped


def fork_tp_dropout(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Give the dropout that acts on tp-sharded activations its own stream per tp rank: attention (this rank's
    heads) and, with sequence parallelism, the blocks' residual dropout (this rank's sequence shard)."""
    rank = tp_mesh.get_local_rank()
    for name, module in model.named_modules():
        attention = isinstance(module, Attention) and module.dropout_p > 0
        residual = isinstance(module, nn.Dropout) and module.p > 0 and _in_block(name)
        if attention or (sequence_parallel and residual):
            fork_rng_per_tp_rank(module, rank)


def _in_block(name: str) -> bool:
    # blocks live in `layers` ModuleDicts (layers.N, encoder.layers.N, decoder.layers.N) and in the multi-token
    # prediction depths (mtp.K.block)
    return ".layers." in f".{name}" or name.startswith("mtp.")
