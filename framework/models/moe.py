"""Mixture-of-Experts feed-forward: router, capacity, grouped experts, shared experts.

One MoE layer (`MoE`, the block's `feed_forward` in MoE layers) maps tokens [B, S, D] -> [B, S, D]:

1. `Router`: logits = x W_r (fp32, outside autocast: Switch Transformer's selective precision), scores by softmax
   or sigmoid; the top_k experts are chosen on scores + `expert_bias` (aux-loss-free balancing, DeepSeek-V3: the
   bias steers selection only and never enters the weights), optionally only among the best `topk_groups` groups
   of experts (DeepSeek-V3 group-limited routing); weights are the chosen scores, renormalised and scaled.
2. `capacity_keep`: with a capacity factor, each expert keeps at most C assignments (drop policy below).
3. `dispatch` -> `GroupedExperts` -> `combine`: assignments are sorted by expert, each expert runs once on its
   contiguous slice of tokens (a loop over experts, never over tokens), and the weighted outputs are added back
   per token. Expert parallelism (framework/parallel/expert.py) installs `MoE.run_experts`: it sends the sorted
   tokens to the ranks owning their experts (all_to_all_single), runs the local experts and sends the outputs back,
   so `dispatch`/`combine` (the local gather and weighted sum) are the same code in every layout.
4. Shared experts (DeepSeekMoE) run on every token and are added, optionally scaled per token by a sigmoid gate
   (moe.shared_expert_gate: Qwen2-MoE, Qwen3-Next).

Drop policy (capacity_factor set): C = ceil(capacity_factor x N x top_k / n_experts) for N tokens of the
micro-batch. Assignments are ranked per expert in the order (choice rank k, token index t): every token's first
choice comes before any token's second choice, and within one rank the earlier token (flattened [B, S] order)
comes first (GShard, Lepikhin et al. 2020). An assignment is kept iff fewer than C assignments to its expert
come before it; a dropped assignment contributes nothing (the token keeps its other experts and the residual;
the remaining weights are not renormalised). Dropless (capacity_factor null) keeps every assignment.

Each forward stores a `RoutingRecord` in `last_routing`: the sufficient statistics of the balancing losses per
sequence (so any scope can be formed from them and all-reduced by the trainer), plus load metrics. This module
never imports torch.distributed; the losses themselves live in framework/train/moe_loss.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig, MoEConfig
from framework.models.mlp import GATED, FeedForward, activation, gated_unit


@dataclass
class Routing:
    """The router's decision for N tokens: `experts` [N, K] long, `weights` [N, K] (grad flows to the router),
    `logits` [N, E] fp32 and `probs` [N, E] (softmax, or sigmoid scores normalised to sum 1 per token)."""

    experts: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor


@dataclass
class RoutingRecord:
    """Statistics of one MoE layer's forward over a micro-batch of B sequences (all sums over tokens).

    prob_sums [B, E]: sum over the sequence of the router probabilities (with grad: P_i of the aux loss);
    counts [B, E]: assignments chosen per sequence and expert, before capacity dropping (f_i; no grad);
    z_sum: sum over tokens of logsumexp(logits)^2 (with grad; ST-MoE router z-loss);
    entropy_sum: sum over tokens of the entropy of `probs` (no grad); dropped: assignments dropped (no grad);
    tokens: N = B x S."""

    prob_sums: torch.Tensor
    counts: torch.Tensor
    z_sum: torch.Tensor
    entropy_sum: torch.Tensor
    dropped: torch.Tensor
    tokens: int


class Router(nn.Module):
    """Linear gate over experts plus the selection rules of MoEConfig."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(cfg.d_model, moe.n_experts, bias=moe.router_bias)  # gpt-oss has a bias
        if moe.has_expert_bias:
            # A buffer, not a parameter: it is updated from the observed load, never by gradients, and it is
            # in state_dict() so checkpoints restore it (DeepSeek-V3, auxiliary-loss-free balancing; fixed when
            # bias_update_rate is 0, as an imported GLM-4.5 router's e_score_correction_bias).
            self.register_buffer("expert_bias", torch.zeros(moe.n_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, D] -> Routing."""
        if self.training and self.moe.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.moe.jitter, 1.0 + self.moe.jitter)
            x = x * noise  # Switch Transformer's multiplicative jitter, training only
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.gate.bias is None else self.gate.bias.float()
            logits = F.linear(x.float(), self.gate.weight.float(), bias)
        if self.moe.router == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)  # DeepSeek-V3's normalised scores for P_i
        experts = self._select(scores.detach())
        weights = scores.gather(-1, experts)
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return Routing(experts, weights * self.moe.route_scale, logits, probs)

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k experts on scores + bias, restricted to the best groups when n_groups > 1."""
        bias = getattr(self, "expert_bias", None)
        choice = scores + bias if bias is not None else scores
        if self.moe.n_groups > 1:
            choice = self._mask_groups(choice)
        return choice.topk(self.moe.top_k, dim=-1).indices

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3: a group scores the sum of its two best experts; experts outside the best topk_groups
        groups are set to -inf so top-k cannot pick them."""
        n, e, g = choice.shape[0], self.moe.n_experts, self.moe.n_groups
        grouped = choice.view(n, g, e // g)
        group_score = grouped.topk(min(2, e // g), dim=-1).values.sum(dim=-1)
        best = group_score.topk(self.moe.topk_groups, dim=-1).indices
        allowed = torch.zeros(n, g, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        return grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(n, e)


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, n_experts: int) -> int:
    """C = ceil(capacity_factor x tokens x top_k / n_experts) assignments per expert (Switch/GShard)."""
    return math.ceil(capacity_factor * tokens * top_k / n_experts)


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """[N, K] bool: which assignments survive the drop policy of this module's docstring."""
    n, k = experts.shape
    by_priority = experts.t().reshape(-1)  # index k * N + t: first choices of all tokens, then second choices
    order = torch.argsort(by_priority, stable=True)
    sorted_experts = by_priority[order]
    counts = count_ids(sorted_experts, n_experts)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(n * k, device=experts.device) - starts[sorted_experts]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view(k, n).t()


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] long: how often each of 0..n-1 occurs in `ids`. A scatter-add, not torch.bincount, which on CUDA reads
    the largest id back to the host (a sync) to size its output."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


@dataclass
class Dispatch:
    """All N x K assignments sorted by expert, the kept ones first: `tokens` [N K] token index of each assignment,
    `weights` [N K, 1] (0 for a dropped assignment), `counts` [E] kept assignments per expert (a device tensor:
    nothing here waits for the device). Dropped assignments (capacity) sit after the last expert's rows: no expert
    runs on them and their output rows are zeros, so the shapes never depend on the routing (no boolean masking,
    whose output size would have to be read back from the device)."""

    tokens: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor


def dispatch(x: torch.Tensor, routing: Routing, keep: torch.Tensor | None) -> tuple[torch.Tensor, Dispatch]:
    """Gather each assignment's token, grouped by expert (stable: token order within an expert), dropped last."""
    n, k = routing.experts.shape
    n_experts = routing.logits.shape[-1]
    experts = routing.experts.reshape(-1)
    tokens = torch.arange(n, device=x.device).unsqueeze(1).expand(n, k).reshape(-1)
    weights = routing.weights.reshape(-1)
    if keep is not None:
        mask = keep.reshape(-1)
        experts = torch.where(mask, experts, n_experts)  # the dropped sort after every expert
        weights = torch.where(mask, weights, 0.0)
    order = torch.argsort(experts, stable=True)
    counts = count_ids(experts, n_experts + 1)[:n_experts]
    plan = Dispatch(tokens[order], weights[order].unsqueeze(-1), counts)
    return x.index_select(0, plan.tokens), plan


def combine(expert_out: torch.Tensor, plan: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (the inverse of `dispatch`)."""
    out = expert_out.new_zeros(n_tokens, expert_out.shape[-1])
    weighted = expert_out * plan.weights.to(expert_out.dtype)
    return out.index_add_(0, plan.tokens, weighted)


ExpertKernel = Literal["auto", "loop", "grouped"]
"""How `GroupedExperts` runs its experts: "loop" = one matmul chain per expert over its slice of rows (the
reference; it slices on the host, so it reads the counts back: one sync per call); "grouped" = three
torch._grouped_mm calls over all experts, with the experts' row offsets on the device (no sync); "auto" = grouped
on CUDA where `grouped_mm_fits`, else the loop (the CPU path)."""


def grouped_mm_fits(device_type: str, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether "auto" takes torch._grouped_mm: on CUDA in bf16 (its CUTLASS kernel; other dtypes fall back to a
    loop inside torch), with every matrix row a multiple of 16 bytes (torch's stride rule), and where torch has it."""
    aligned = all(w * torch.finfo(dtype).bits // 8 % 16 == 0 for w in widths)
    return device_type == "cuda" and dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")


@dataclass
class ExpertWeights:
    """The stacked weights one call uses (the local experts' rows under expert parallelism): w1/w3 [E, H, D],
    w2 [E, D, H] and, with moe.expert_linear_bias, b1/b3 [E, H] and b2 [E, D]."""

    w1: torch.Tensor
    w3: torch.Tensor | None
    w2: torch.Tensor
    b1: torch.Tensor | None = None
    b3: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    def expert(self, e: int) -> ExpertWeights:
        """Expert e's matrices and biases."""
        return ExpertWeights(
            *(None if t is None else t[e] for t in (self.w1, self.w3, self.w2, self.b1, self.b3, self.b2))
        )


class GroupedExperts(nn.Module):
    """`n_experts` MLPs with stacked weights: w1 [E, H, D] (gate / up), w3 [E, H, D] (up of gated MLPs),
    w2 [E, D, H] (down), and with moe.expert_linear_bias their biases b1, b3 [E, H], b2 [E, D] (gpt-oss).
    Stacked so expert parallelism can shard dim 0 over the ep mesh dimension."""

    def __init__(self, cfg: ModelConfig, n_experts: int, hidden: int, kernel: ExpertKernel = "auto") -> None:
        super().__init__()
        self.act = activation(cfg)
        self.glu = gated_unit(cfg)
        d, gated = cfg.d_model, cfg.mlp in GATED
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d)) if gated else None
        self.w2 = nn.Parameter(torch.empty(n_experts, d, hidden))
        biased = cfg.moe is not None and cfg.moe.expert_linear_bias
        self.b1 = nn.Parameter(torch.zeros(n_experts, hidden)) if biased else None
        self.b3 = nn.Parameter(torch.zeros(n_experts, hidden)) if biased and gated else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, d)) if biased else None
        self.kernel: ExpertKernel = kernel
        # Expert parallelism sets this to return the rank's own experts' rows of a stacked weight (a DTensor
        # sharded over experts; keeps this file free of torch.distributed), like Attention.local_view.
        self.local_view: Callable[[torch.Tensor], torch.Tensor] = _identity

    def weights(self) -> ExpertWeights:
        """This rank's experts' weights, read through local_view."""
        names = ("w1", "w3", "w2", "b1", "b3", "b2")
        return ExpertWeights(
            *(None if getattr(self, n) is None else self.local_view(getattr(self, n)) for n in names)
        )

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [R, D] sorted by expert with counts[e] rows for the e-th expert held here, then R - sum(counts) rows
        no expert takes (dropped assignments) -> [R, D], zeros in those last rows."""
        ws = self.weights()
        if self.uses_grouped_mm(x):
            return self._grouped(x, counts, ws)
        return self._loop(x, counts.tolist(), ws)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """The kernel `forward` takes for x (see ExpertKernel)."""
        if self.kernel != "auto":
            return self.kernel == "grouped"
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return grouped_mm_fits(device, dtype, (self.w1.shape[-1], self.w1.shape[-2]))

    def _loop(self, x: torch.Tensor, counts: list[int], ws: ExpertWeights) -> torch.Tensor:
        kept = sum(counts)
        outputs = [
            self._mlp(chunk, ws.expert(e)) for e, chunk in enumerate(x[:kept].split(counts)) if counts[e] > 0
        ]
        if not outputs:
            # No rows at all: still pass the empty input through an expert, so the output depends on the input
            # and the weights (zero gradients, not None). Under expert parallelism every rank's backward must
            # then reach the same collectives (the reverse all-to-all, the experts' gradient reduction).
            outputs = [self._mlp(x[:0], ws.expert(0))]
        if kept < x.shape[0]:
            outputs.append(outputs[0].new_zeros(x.shape[0] - kept, outputs[0].shape[-1]))
        return torch.cat(outputs)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor, ws: ExpertWeights) -> torch.Tensor:
        """The loop's function with torch._grouped_mm: expert e takes rows [offs[e-1], offs[e]). Rows past the last
        offset (dropped) are masked on the way in (their gradient) and out (their values): torch leaves them
        unspecified. Biases are gathered per row by its expert (a device-side searchsorted, no sync)."""
        offs = counts.cumsum(0).to(torch.int32)
        rows = torch.arange(x.shape[0], device=x.device)
        taken = (rows < offs[-1]).unsqueeze(-1)
        row_expert = torch.searchsorted(offs, rows.to(torch.int32), right=True).clamp(max=offs.shape[0] - 1)
        x = torch.where(taken, x, 0.0)
        gate = _add_row_bias(_grouped_linear(x, ws.w1, offs), ws.b1, row_expert)
        if ws.w3 is None:
            hidden = self.act(gate)
        else:
            hidden = self.glu(gate, _add_row_bias(_grouped_linear(x, ws.w3, offs), ws.b3, row_expert))
        out = _add_row_bias(_grouped_linear(hidden, ws.w2, offs), ws.b2, row_expert)
        return torch.where(taken, out, 0.0)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n, D] (the same function as FeedForward with w1[e], w3[e], w2[e] and their biases)."""
        return self._mlp(x, self.weights().expert(e))

    def _mlp(self, x: torch.Tensor, ws: ExpertWeights) -> torch.Tensor:
        gate = F.linear(x, ws.w1, ws.b1)
        hidden = self.act(gate) if ws.w3 is None else self.glu(gate, F.linear(x, ws.w3, ws.b3))
        return F.linear(hidden, ws.w2, ws.b2)


def _add_row_bias(y: torch.Tensor, bias: torch.Tensor | None, row_expert: torch.Tensor) -> torch.Tensor:
    """y [R, W] plus each row's expert's bias [E, W] (unchanged without biases)."""
    return y if bias is None else y + bias.index_select(0, row_expert).to(y.dtype)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of expert e times weight[e]^T (F.linear per group), in the autocast dtype as F.linear would run."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)


RunExperts = Callable[[GroupedExperts, torch.Tensor, torch.Tensor], torch.Tensor]
"""(experts, tokens [R, D] sorted by expert, counts per expert [E] on the device) -> expert outputs [R, D] in the
same order (see GroupedExperts.forward)."""


def run_local_experts(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Every expert lives in this process: run them directly."""
    return experts(x, counts)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class MoE(nn.Module):
    """The feed-forward of an MoE block: `router`, `experts`, optional `shared_experts` (see module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.moe is None:
            raise ValueError("MoE needs model.moe")
        moe = cfg.moe
        self.moe = moe
        hidden = moe.resolved_expert_hidden(cfg.ffn_hidden)
        self.router = Router(cfg, moe)
        self.experts = GroupedExperts(cfg, moe.n_experts, hidden)
        if moe.n_shared_experts > 0:
            self.shared_experts = FeedForward(cfg, hidden=moe.resolved_shared_hidden(cfg.ffn_hidden))
        if moe.shared_expert_gate:
            # Qwen2-MoE / Qwen3-Next: a per-token scalar gate sigmoid(x w_g) on the shared experts' output
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self.last_routing: RoutingRecord | None = None
        # Expert parallelism replaces this with the all-to-all exchange (framework/parallel/expert.py).
        self.run_experts: RunExperts = run_local_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        keep = self._keep(routing, tokens.shape[0])
        routed, plan = dispatch(tokens, routing, keep)
        out = combine(self.run_experts(self.experts, routed, plan.counts), plan, tokens.shape[0])
        shared = getattr(self, "shared_experts", None)
        if shared is not None:
            out = out + self._shared(shared, tokens)
        self.last_routing = routing_record(routing, keep, shape[0])
        return out.view(shape)

    def _shared(self, shared: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The shared experts on every token, times sigmoid(shared_expert_gate(x)) when gated."""
        out = shared(tokens)
        gate = getattr(self, "shared_expert_gate", None)
        return out if gate is None else out * torch.sigmoid(gate(tokens))

    def _keep(self, routing: Routing, n_tokens: int) -> torch.Tensor | None:
        if self.moe.capacity_factor is None:
            return None
        capacity = expert_capacity(self.moe.capacity_factor, n_tokens, self.moe.top_k, self.moe.n_experts)
        return capacity_keep(routing.experts, self.moe.n_experts, capacity)


def routing_record(routing: Routing, keep: torch.Tensor | None, batch: int) -> RoutingRecord:
    """Per-sequence sums of one forward (see RoutingRecord)."""
    n, e = routing.probs.shape
    probs = routing.probs.view(batch, n // batch, e)
    choices = F.one_hot(routing.experts.view(batch, -1), e).sum(dim=1)
    probs_detached = routing.probs.detach()
    entropy = -(probs_detached * probs_detached.clamp(min=1e-20).log()).sum()
    dropped = (~keep).sum() if keep is not None else torch.zeros((), device=probs.device, dtype=torch.long)
    return RoutingRecord(
        prob_sums=probs.sum(dim=1),
        counts=choices,
        z_sum=torch.logsumexp(routing.logits, dim=-1).square().sum(),
        entropy_sum=entropy,
        dropped=dropped,
        tokens=n,
    )


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The model's MoE modules by name (empty for a dense model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
