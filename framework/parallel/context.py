"""Context parallelism, Ulysses style (Jacobs et al. 2023, DeepSpeed-Ulysses): the sequence split over `cp` ranks.

Each cp rank holds a contiguous shard [S/cp] of every sample of its data-parallel slice; everything per token (the
embeddings, norms, MLPs, the head and the loss) runs on the shard. Attention is the only place tokens meet: after
the q/k/v projections and RoPE, an all-to-all turns [B, heads, S/cp, D] into [B, heads/cp, S, D] (each rank: the
whole sequence for its block of heads), the model's own attention kernel runs with any mask, bias or temperature,
and a second all-to-all turns the output back into sequence shards. Both are torch's autograd-aware functional
all-to-alls: the backward is the reverse exchange.

What runs where:
* The engine slices the batch (`shard_batch`, before forward: training and evaluation), so data loading does not
  change — every cp peer reads the same data-parallel slice. Token ids, labels, token types, document ids and the
  position ids are sliced; the position ids are computed first from the whole sequence (restarting at document
  starts), so a shard carries its GLOBAL positions (RoPE, learned/sinusoidal tables). Prefix lengths [B] are
  global and passed whole.
* The mask and the distance biases need the whole sequence: each stack's forward all-gathers the position and
  document ids over cp once (the first layer's attention; cached in the stack's AttentionContext) — the model
  keeps taking per-token inputs of one shape, and only attention sees the full sequence.
* Heads are global: this rank's block of heads after the all-to-all is cp_rank of the cp blocks of the tp-local
  heads, so `head_offset` (ALiBi slopes) adds cp_rank x heads/(tp x cp) to tensor parallelism's offset, per-head
  parameters (learned temperature, soft distance weights) are narrowed through `local_view`, and the T5 relative
  bias is computed for the whole sequence (positions gathered) and narrowed to this rank's heads.
* Parameters are replicated over cp but each rank's gradient covers its tokens (or heads) only: FSDP2/DDP run over
  the data-parallel ranks x cp (`data_parallel_mesh`), and the engine's loss multiplier and global sums include cp.

The model (framework/models) stays free of torch.distributed: everything here is installed through the hooks
`Attention.attend_hook`, `Attention.local_view`, `Attention.head_offset` and an instance-level wrapper of
`RelativePositionBias.bias`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from framework.kernels.te import ContextParallelArgs, TEAttention, with_ring
from framework.models.attention import AttendFn, Attention, AttentionContext
from framework.models.positions import RelativePositionBias, default_positions
from framework.models.recurrence import RecurrentMixer
from framework.parallel.dims import ParallelDims
from framework.parallel.recurrent import install_recurrent_cp
from framework.parallel.ring import RingAttention, RingPlan, ScoreTerms, ring_tokens, token_order

PER_TOKEN = ("input_ids", "labels", "positions", "document_ids", "token_type_ids")
"""Batch entries [B, S, ...] that are sliced along the sequence (everything else, e.g. prefix_lengths, is whole)."""
_FULL_CONTEXT = "context_parallel"
"""Key of the whole-sequence AttentionContext in the stack's (per-forward) context cache."""


def shard_batch(
    batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh, dims: ParallelDims | None = None
) -> dict[str, torch.Tensor]:
    """This cp rank's sequence shard of every per-token entry, with global position ids added: contiguous, or
    with ring attention the zigzag order's (framework/parallel/ring.py token_order)."""
    order = None
    if dims is not None and dims.cp_ring > 1:
        seq = batch["input_ids"].shape[1]
        order = cached_token_order(seq, dims.cp_ring, dims.cp_ulysses, dims.cp_balanced)
    return shard_sequence(batch, cp_mesh.size(), cp_mesh.get_local_rank(), order)


@functools.cache
def cached_token_order(seq: int, ring: int, ulysses: int, balanced: bool) -> torch.Tensor:
    return token_order(seq, ring, ulysses, balanced=balanced)


def shard_sequence(
    batch: dict[str, torch.Tensor], cp: int, rank: int, order: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """`shard_batch` for sequence-parallel rank `rank` of `cp` (also used by the DeepSpeed engine's Ulysses);
    `order`: the natural index of each position of the sharded order (None: the natural order)."""
    if cp == 1:
        return batch
    ids = batch["input_ids"]
    if ids.shape[1] % cp:
        # ParallelDims checks data.seq_len; a batch of another length would give uneven all-to-all blocks
        raise ValueError(f"sequence length {ids.shape[1]} is not divisible by parallel.cp={cp}")
    if "positions" not in batch:
        # computed on the whole sequence: a shard's positions continue where the previous shard's stopped
        positions = default_positions(ids.shape[0], ids.shape[1], ids.device, batch.get("document_ids"))
        batch = {**batch, "positions": positions}
    return {k: _shard(v, cp, rank, order) if k in PER_TOKEN else v for k, v in batch.items()}


def _shard(t: torch.Tensor, cp: int, rank: int, order: torch.Tensor | None = None) -> torch.Tensor:
    if order is not None:
        t = t.index_select(1, order.to(t.device))
    return t.tensor_split(cp, dim=1)[rank]


def data_parallel_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2/DDP reduce gradients over: the data-parallel dimensions with cp folded in (torchtitan's
    dp_shard_cp), since cp ranks hold replicas whose gradients are partial sums. DDP: (dp_replicate, cp) flattened;
    FSDP2: (dp_shard, cp) flattened; HSDP: dp_replicate x that. Flattening is idempotent (cached on the mesh)."""
    if dims.cp == 1:
        names = {"ddp": ("dp_replicate",), "fsdp": ("dp_shard",), "hsdp": ("dp_replicate", "dp_shard")}
        return mesh[names[dims.data_parallel]]
    if dims.data_parallel == "ddp":
        return _flat(mesh, ("dp_replicate", "cp"))
    shard = _flat(mesh, ("dp_shard", "cp"))
    # HSDP needs the 2-D (replicate, shard) mesh: sliced from the root by the flattened dimension's name
    return mesh["dp_replicate", "dp_shard_cp"] if dims.data_parallel == "hsdp" else shard


def _flat(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    return mesh[names]._flatten("_".join(names))


def apply_context_parallel(model: nn.Module, dims: ParallelDims, cp_mesh: DeviceMesh) -> None:
    """Install the Ulysses exchange on every attention module and the whole-sequence T5 bias (module docstring).
    Runs after tensor parallelism: the head offset and local views compose with tp's."""
    if dims.cp == 1:
        return
    if dims.cp_ring > 1:
        install_ring_attention(model, dims, cp_mesh)
        return
    install_sequence_parallel(model, cp_mesh.get_group(), dims.tp, ulysses_attend)


def install_sequence_parallel(
    model: nn.Module, group: dist.ProcessGroup, tp: int, exchange: Callable[..., torch.Tensor]
) -> None:
    """Every attention module of `model` exchanges sequence for heads over `group` with `exchange` (called as
    exchange(attend, q, k, v, ctx, group=group): `ulysses_attend`, or DeepSpeed's DistributedAttention in
    framework/deepspeed/ulysses.py); heads, per-head parameters and the T5 bias follow this rank's block."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    for module in model.modules():
        if isinstance(module, Attention):
            heads = module.n_heads // (tp * cp)  # this rank's heads after the all-to-all
            module.head_offset += rank * heads
            module.local_view = functools.partial(_narrow_heads, module.local_view, rank * heads, heads)
            module.attend_hook = functools.partial(exchange, group=group)
        elif isinstance(module, RelativePositionBias):
            module.bias = functools.partial(_whole_sequence_bias, module.bias, group=group)
        elif isinstance(module, RecurrentMixer):
            install_recurrent_cp(module, group)  # state passing, no head exchange (recurrent.py)


def _narrow_heads(
    inner: Callable[[torch.Tensor], torch.Tensor], start: int, length: int, t: torch.Tensor
) -> torch.Tensor:
    """This cp rank's heads of a per-head parameter, within the (tp-local) heads `inner` returns."""
    return inner(t).narrow(0, start, length)


def ulysses_attend(
    attend: AttendFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttentionContext,
    *,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """q/k/v [B, heads, S/cp, D] -> all-to-all -> [B, heads/cp, S, D] -> attend -> back to [B, heads, S/cp, D]."""
    full = whole_sequence_context(ctx, group)
    out = attend(*(_sequence_to_heads(t, group) for t in (q, k, v)), full)
    return _heads_to_sequence(out, group)


def _sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, s, D] (this rank's tokens, all heads) -> [B, H/cp, cp * s, D] (all tokens, this rank's heads)."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    # dim 0 = destination rank (its block of heads); all_to_all_single exchanges equal blocks of dim 0
    send = x.reshape(b, cp, h // cp, s, d).movedim(1, 0).contiguous()
    received = all_to_all_single_autograd(send, None, None, group)  # dim 0 = source rank = sequence block
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse: [B, H/cp, S, D] -> [B, H, S/cp, D]."""
    cp = dist.get_world_size(group)
    b, h, seq, d = x.shape
    send = x.reshape(b, h, cp, seq // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # dim 0 = sequence block
    received = all_to_all_single_autograd(send, None, None, group)  # dim 0 = source rank = block of heads
    return received.movedim(0, 1).reshape(b, cp * h, seq // cp, d)


def whole_sequence_context(ctx: AttentionContext, group: dist.ProcessGroup) -> AttentionContext:
    """The stack's context over the whole sequence, built once per forward: positions and document ids gathered
    over cp, the T5 bias (already whole, see `_whole_sequence_bias`) narrowed to this rank's heads. RoPE is not
    carried: q and k were rotated on the shard, with their global positions."""
    cached = ctx._cache.get(_FULL_CONTEXT)
    if isinstance(cached, AttentionContext):
        return cached
    documents = _gather_sequence(ctx.mask.q_documents, group)
    mask = dataclasses.replace(ctx.mask, q_documents=documents, k_documents=documents)
    full = AttentionContext(
        mask,
        positions=_gather_sequence(ctx.positions, group),
        position_bias=_local_heads(ctx.position_bias, group),
    )
    ctx._cache[_FULL_CONTEXT] = full  # type: ignore[assignment]  # per-forward cache, dropped with ctx
    return full


def _gather_sequence(t: torch.Tensor | None, group: dist.ProcessGroup) -> torch.Tensor | None:
    """[B, S/cp] ids of every cp rank, concatenated in rank order along the sequence (no gradient: ids)."""
    if t is None:
        return None
    t = t.contiguous()  # default position ids are an expanded arange
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=1)


def _local_heads(bias: torch.Tensor | None, group: dist.ProcessGroup) -> torch.Tensor | None:
    """This cp rank's block of a [B, heads, S, S] bias's heads (the heads the all-to-all gave this rank)."""
    if bias is None:
        return None
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = bias.shape[1] // cp
    return bias.narrow(1, rank * heads, heads)


def _whole_sequence_bias(
    bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """RelativePositionBias.bias over the whole sequence (positions gathered over cp): [B, heads, S, S]."""
    q_all = _gather_sequence(q_positions, group)
    # self-attention passes one tensor twice: gather it once
    k_all = q_all if k_positions is q_positions else _gather_sequence(k_positions, group)
    return bias(q_all, k_all)


# ------------------------------------------------------------------------------------------ ring attention
def install_ring_attention(model: nn.Module, dims: ParallelDims, cp_mesh: DeviceMesh) -> None:
    """Ring attention over cp_ring, inside a Ulysses head exchange over cp_ulysses when it is > 1
    (framework/parallel/ring.py). cp rank c = ring rank c // cp_ulysses, ulysses rank c % cp_ulysses."""
    ring, ulysses = dims.cp_ring, dims.cp_ulysses
    sub = cp_mesh._unflatten(0, (ring, ulysses), ("cp_ring", "cp_ulysses"))
    ring_group, ulysses_group = sub["cp_ring"].get_group(), sub["cp_ulysses"].get_group()
    uly_rank = sub["cp_ulysses"].get_local_rank()
    layout = RingLayout(
        cp_mesh.get_group(), ring_group, ulysses_group if ulysses > 1 else None, uly_rank, dims
    )
    for module in model.modules():
        if isinstance(module, Attention):
            heads = module.n_heads // (dims.tp * ulysses)  # this rank's heads after the Ulysses exchange
            module.head_offset += uly_rank * heads
            module.local_view = functools.partial(_narrow_heads, module.local_view, uly_rank * heads, heads)
            module.attend_hook = functools.partial(ring_attend, module=module, layout=layout)
        elif isinstance(module, RelativePositionBias):
            module.bias = functools.partial(_natural_sequence_bias, module.bias, layout=layout)


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """The process groups of one hybrid CP layout, this rank's place in its Ulysses group, and its sharding
    (ring.token_order)."""

    cp_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup | None
    ulysses_rank: int
    dims: ParallelDims

    def te_ring(self) -> ContextParallelArgs:
        """TE's p2p context parallelism over the ring (with a side CUDA stream for its overlap)."""
        stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        return with_ring(self.ring_group, dist.get_process_group_ranks(self.ring_group), stream)

    def order(self, seq: int) -> torch.Tensor:
        return cached_token_order(seq, self.dims.cp_ring, self.dims.cp_ulysses, self.dims.cp_balanced)

    def natural(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """[B, S/cp] ids of this rank's tokens -> [B, S] of the whole sequence in natural order (gathered over
        cp, then un-permuted; no gradient: ids)."""
        gathered = _gather_sequence(t, self.cp_group)
        if gathered is None:
            return None
        natural = torch.empty_like(gathered)
        natural[:, self.order(gathered.shape[1]).to(gathered.device)] = gathered
        return natural


def ring_attend(
    attend: AttendFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttentionContext,
    *,
    module: Attention,
    layout: RingLayout,
) -> torch.Tensor:
    """q/k/v [B, heads, S/cp, D] -> (Ulysses: [B, heads/cp_ulysses, S/cp_ring, D]) -> ring attention -> back.
    The module's own kernel (`attend`) is not called: the ring computes its blocks itself, with the module's
    per-head score terms (ALiBi slopes by global head, learned temperatures and distance weights, sinks)."""
    if isinstance(module.kernel, TEAttention):  # model.kernels te: TE's own ring (framework/kernels/te.py)
        if module.kernel.context_parallel is None:  # kernels are installed after parallelize: given it here
            module.kernel = type(module.kernel)(layout.te_ring())
        return attend(q, k, v, ctx)
    group = layout.ulysses_group
    if group is not None:
        q, k, v = (_sequence_to_heads(t, group) for t in (q, k, v))
    heads = q.shape[1]
    plan = _ring_plan(ctx, layout, q.shape[2] * layout.dims.cp_ring, module, q.device)
    table = ctx.position_bias
    if table is not None and table.shape[1] != heads:  # the T5 bias of the tp-local heads: this rank's block
        table = table.narrow(1, layout.ulysses_rank * heads, heads)
    # the model's own per-head terms (framework/models/attention.py), already narrowed by local_view
    score = ScoreTerms(
        module._distance_coefficient(heads), table, module._inv_temperature(heads, q.device), module._sinks()
    )
    out = RingAttention.apply(q, k, v, plan, *score.tensors())
    return out if group is None else _heads_to_sequence(out, group)


def _ring_plan(
    ctx: AttentionContext, layout: RingLayout, seq: int, module: Attention, device: torch.device
) -> RingPlan:
    """The block masks' inputs, once per forward and stack context: every ring rank's natural token indices, and
    the document and position ids of the whole sequence in natural order (gathered over cp, un-permuted)."""
    key = f"ring_plan_{module.scale}_{module.softcap}"
    cached = ctx._cache.get(key)
    if isinstance(cached, RingPlan):
        return cached
    dims = layout.dims
    mask = ctx.mask
    if mask.q_documents is not None:
        documents = layout.natural(mask.q_documents)
        mask = dataclasses.replace(mask, q_documents=documents, k_documents=documents)
    order = layout.order(seq)
    tokens = [ring_tokens(order, dims.cp_ring, j).to(device) for j in range(dims.cp_ring)]
    rank, positions = dist.get_rank(layout.ring_group), layout.natural(ctx.positions)
    plan = RingPlan(layout.ring_group, rank, mask, tokens, module.scale, module.softcap, positions)
    ctx._cache[key] = plan  # type: ignore[assignment]  # per-forward cache, dropped with ctx
    return plan


def _natural_sequence_bias(
    bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    layout: RingLayout,
) -> torch.Tensor:
    """RelativePositionBias.bias over the whole sequence in natural order (what the ring's blocks index with
    their tokens' natural indices): [B, heads, S, S]."""
    q_all = layout.natural(q_positions)
    k_all = q_all if k_positions is q_positions else layout.natural(k_positions)
    return bias(q_all, k_all)
