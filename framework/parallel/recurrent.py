"""Tensor and context parallelism for the recurrent mixers (Gated DeltaNet, Mamba-2): layout code only.

Tensor parallelism splits them by heads, as attention is split: every input projection is column-parallel (each
rank computes its heads' q/k/v/gates, or x/B/C/dt), the output projection row-parallel, and the per-channel and
per-head parameters (depthwise conv taps, A_log, dt_bias, D, Mamba-2's gated-norm gains) are Shard(0) DTensors the
module reads through `local_view` (the conv is depthwise, so its channels shard with their heads). A parameter
every head shares (Gated DeltaNet's per-head-dim norm gain) stays whole on every rank; each rank's gradient covers
its heads only, so the module reads it through `shared_view`, an identity whose backward sums the gradient over the
tensor-parallel group (Megatron's "copy to tensor-parallel region").

Context parallelism (contiguous sequence shards, as Ulysses uses) is exact for a linear recurrence. A shard's final
state is an affine function of its initial state, S_out = T(S_in) + S_out(0), where T is linear: for the delta rule
the d_k x d_k product prod_t exp(g_t) (I - beta_t k_t k_t^T), for Mamba-2 the scalar decay prod_t exp(dt_t A) per
head (both zero past a document start inside the shard). Each rank computes its shard's (T, S_out(0)); one
autograd-aware all-gather gives every rank all of them, each rank folds the earlier ranks' maps in order to get its
true initial state, and runs its shard again from it. The causal depthwise convolution needs the kernel - 1 tokens
before the shard: they come from the previous rank through the same all-gather (a halo), with their document ids,
so a document that crosses the shard boundary is convolved exactly and one that starts at it is not mixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
)

from framework.models.attention import AttentionContext
from framework.models.recurrence import RecurrentMixer, document_starts

__all__ = ["RecurrentMixer", "install_recurrent_cp", "recurrent_tp_plan"]


# ------------------------------------------------------------------------------------------- tensor parallel
class _SumGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (a replicated input whose uses are split)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_gradient(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _SumGradient.apply(t, group)


def recurrent_tp_plan(
    name: str, module: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, seq_layout: object
) -> dict[str, ParallelStyle]:
    """The plan entries of one recurrent mixer; shards its per-channel parameters in place (module docstring)."""
    from framework.parallel.tensor import _shard, _to_local

    tp = tp_mesh.size()
    columns, per_channel = module.tp_columns, module.tp_per_channel
    if _shard(module, per_channel, 0, tp_mesh):
        module.local_view = _to_local
    module.shared_view = functools.partial(sum_gradient, group=tp_mesh.get_group())
    module.tp_size = tp
    plan: dict[str, ParallelStyle] = {f"{name}.{w}": ColwiseParallel() for w in columns}
    plan[f"{name}.{module.tp_row}"] = RowwiseParallel(
        output_layouts=seq_layout if sequence_parallel else Replicate()
    )
    if sequence_parallel:
        plan[name] = PrepareModuleInput(
            input_layouts=(seq_layout, None), desired_input_layouts=(Replicate(), None)
        )
    return plan


# ------------------------------------------------------------------------------------------ context parallel
class _GatherStack(torch.autograd.Function):
    """all_gather of equal tensors into a [world, ...] stack; the backward sums every rank's gradient of slot r
    (each rank may use every slot) and hands rank r its own. gloo has no reduce_scatter, so this is an all_reduce
    of the stacked gradient (a CP group is small and the states are d_k x d_v per head)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def gather_stack(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherStack.apply(t, group)


def install_recurrent_cp(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Context parallelism of one recurrent mixer over `group` (module docstring)."""
    module.starts_hook = functools.partial(_global_starts, group=group)
    module.conv_hook = functools.partial(_halo_conv, group=group)
    module.scan_hook = functools.partial(_state_passing_scan, module, group=group)


def _global_starts(
    ctx: AttentionContext, *, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(this shard's document starts [B, s], the starts of the whole sequence [B, S]) from the gathered ids: a
    shard's first token starts a document only where its id differs from the previous shard's last."""
    from framework.parallel.context import whole_sequence_context

    documents = whole_sequence_context(ctx, group).mask.q_documents
    if documents is None:
        return None
    whole = document_starts(documents)
    local = ctx.mask.q_documents.shape[1]
    rank = dist.get_rank(group)
    return whole[:, rank * local : (rank + 1) * local], whole


def _halo_conv(
    conv: Callable[..., torch.Tensor],
    x: torch.Tensor,
    halo: int,
    starts: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """conv over [previous shard's last `halo` tokens, this shard] (zeros before the first shard), the first
    `halo` outputs dropped; the halo's document starts come from the whole sequence."""
    rank = dist.get_rank(group)
    if halo == 0:
        return conv(x, None if starts is None else starts[0])
    if x.shape[1] < halo:
        raise ValueError(
            f"a context-parallel shard of {x.shape[1]} tokens is shorter than the conv's {halo}-token halo"
        )
    tails = gather_stack(x[:, -halo:], group)
    # every rank indexes the same shifted stack, so every rank's backward runs the gather's all-reduce (a rank
    # that skipped the gathered tensor would leave its peers waiting in a collective)
    before = torch.cat((torch.zeros_like(tails[:1]), tails[:-1]))[rank]
    extended = None
    if starts is not None:
        local, whole = starts
        begin = rank * local.shape[1]
        if rank > 0:
            extended = whole[:, begin - halo : begin + local.shape[1]]
        else:  # the zero halo is its own document: nothing of it reaches the first token
            extended = torch.cat((torch.ones_like(local[:, :halo]), local), dim=1)
    return conv(torch.cat((before, x), dim=1), extended)[:, halo:]


def _state_passing_scan(
    module: nn.Module,
    scan: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    *inputs: torch.Tensor,
    starts: tuple[torch.Tensor, torch.Tensor] | None,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """This shard's outputs from its true initial state: every rank's (transition, zero-start final state) are
    gathered and the earlier ranks' folded in order (module docstring)."""
    local_starts = None if starts is None else starts[0]
    _, final = scan(*inputs, starts=local_starts, initial_state=None)
    transition = module.transition(*inputs, starts=local_starts)
    transitions, finals = gather_stack(transition, group), gather_stack(final, group)
    # every rank's initial state, folded in rank order: state_0 = 0, state_{j+1} = T_j(state_j) + final_j. All
    # of them on every rank (cp - 1 small products), so every rank's graph uses both gathers alike (see above)
    states = [torch.zeros_like(final)]
    for j in range(dist.get_world_size(group) - 1):
        states.append(module.apply_transition(transitions[j], states[-1]) + finals[j])
    state = torch.stack(states)[dist.get_rank(group)]
    out, _ = scan(*inputs, starts=local_starts, initial_state=state)
    return out
