"""Expert parallelism: the experts of every MoE layer split over the `ep` ranks, tokens exchanged all-to-all.

Layout. `ep` ranks are carved from the data-parallel shards x the context-parallel ranks (`ExpertMeshes` in
dims.py: dp_shard, or with cp > 1 the flattened dp_shard_cp, is unflattened into dp_shard_mod_ep x ep, ep
innermost), so the ep ranks of one group hold different tokens: other samples, or other sequence shards. Each stacked expert
weight [E, ...] becomes a DTensor Shard(0) over the ep mesh: rank i of the group holds experts
[i E/ep, (i+1) E/ep), and the parameter keeps the full model's name and global shape (checkpoints, init).

Forward of one MoE layer (`ExpertExchange`, installed as `MoE.run_experts`): every rank routes its own tokens and
sorts its assignments by expert (framework/models/moe.py `dispatch`), so the rows for each destination rank are
contiguous. The per-expert counts are exchanged first (all_to_all_single of an [ep, E/ep] count table), then the
rows (all_to_all_single with those variable splits), the received rows are regrouped from (source rank, expert)
to (expert, source rank) order, the local experts run, and the outputs travel back by the reverse all-to-all in the
order they came. `combine` then weights and adds them per token on the token's own rank. Both row exchanges use
torch's autograd-aware functional all_to_all_single, whose backward is the reverse exchange.

Gradients. The loss is multiplied by dp x cp (framework/engines/native.py: DDP/FSDP average over those ranks, the step wants a sum).
A local expert's gradient already sums the contributions of the tokens of every rank in its ep group, so it must
not be averaged over ep again: it is scaled by 1/ep in backward (`local_view`), and FSDP2 then averages it over the
experts' own data-parallel mesh (dp_replicate x dp_shard_mod_ep, size dp x cp / ep): dp x cp x (group sum) / ep /
(dp x cp / ep) = the sum over all tokens, exactly as one process (power-of-two sizes: the scalings are exact).
Non-expert parameters are reduced over all data-parallel (x cp) ranks as before.

Tensor parallelism: MoE layers are replicated over tp (framework/parallel/tensor.py; with sequence parallel the
layer runs on the whole sequence), so every tp rank of a data-parallel position routes the same tokens and its ep
group (same tp index) exchanges them: identical work and gradients on every tp rank, no extra reduction.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from framework.models.moe import GroupedExperts, moe_layers


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's stacked expert weights over `ep_mesh` (Shard(0), names unchanged) and install the
    all-to-all exchange. Works on the meta device (no values are read)."""
    ep = ep_mesh.size()
    exchange = ExpertExchange(ep_mesh.get_group(), ep)
    for moe in moe_layers(model).values():
        _shard_experts(moe.experts, ep_mesh)
        moe.experts.local_view = functools.partial(_local_rows, grad_scale=1.0 / ep)
        moe.run_experts = exchange


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    """Every MoE layer's experts (FSDP2 shards them over their own data-parallel mesh)."""
    return [moe.experts for moe in moe_layers(model).values()]


def _shard_experts(experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
    for name, param in list(experts.named_parameters(recurse=False)):
        # src_data_rank=None: only slice (every rank computes the same values; the model may be on meta)
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _local_rows(weight: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """This rank's experts of a stacked weight (FSDP2 hands the module the ep-sharded DTensor during forward);
    its gradient scaled by 1/ep (module docstring: the ep group's tokens are already summed in it)."""
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    return _ScaleGrad.apply(local, grad_scale)


class ExpertExchange:
    """`MoE.run_experts` under expert parallelism (see the module docstring). One instance serves every layer."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group = group
        self.ep = ep

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [R, D] sorted by (global) expert, counts [E] on the device (rows past their sum: dropped
        assignments, never sent) -> the experts' outputs for x's rows, same order (zeros in the dropped rows)."""
        send = counts.view(self.ep, counts.numel() // self.ep)
        recv = torch.empty_like(send)  # [source rank, local expert]: rows each rank sends to each of ours
        dist.all_to_all_single(recv, send, group=self.group)
        # all_to_all_single takes its split sizes as host lists: the one host read of an MoE layer under expert
        # parallelism (both directions' splits in one .tolist(); the experts get their counts on the device).
        splits = torch.stack([send.sum(1), recv.sum(1)]).tolist()
        send_splits, recv_splits = splits
        sent = sum(send_splits)
        received = all_to_all_single_autograd(x[:sent], recv_splits, send_splits, self.group)
        order = _expert_major(recv, sum(recv_splits))
        out = experts(received.index_select(0, order), recv.sum(0))
        back = out.index_select(0, torch.argsort(order))  # (source rank, expert) order again
        returned = all_to_all_single_autograd(back, send_splits, recv_splits, self.group)
        if sent == x.shape[0]:
            return returned
        return torch.cat([returned, returned.new_zeros(x.shape[0] - sent, returned.shape[-1])])


def _expert_major(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows arrive in blocks (source s, local expert e), s-major, with counts[s, e] rows each (`rows` in all,
    known on the host: repeat_interleave then needs no read of the device); the permutation that puts them
    e-major (each expert's rows contiguous, by source rank then arrival order)."""
    sources, local = counts.shape
    blocks = torch.arange(sources * local, device=counts.device)
    block = blocks.repeat_interleave(counts.flatten(), output_size=rows)
    key = (block % local) * sources + block // local  # (e, s) order of each row's block
    return torch.argsort(key, stable=True)
