"""Router losses, load metrics and aux-loss-free bias updates of MoE models, per optimizer step.

The MoE layers (framework/models/moe.py) record per-sequence sums after each forward (`RoutingRecord`); this
module turns them into losses and metrics. All losses are averaged over the MoE layers (as Hugging Face's Mixtral
and Qwen3-MoE do), so a coefficient does not depend on depth.

Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4; GShard): aux = E * sum_i f_i * P_i, with f_i the
fraction of the top_k assignments that chose expert i and P_i the mean router probability of expert i (sigmoid
routers: scores normalised per token, DeepSeek-V3 eq. 18-20). Uniform routing gives exactly 1 (the value balanced
routing aims at); Hugging Face's Mixtral version is top_k times ours (its f sums to top_k). Scopes:

* micro_batch: f and P over each micro-batch's tokens; the step's loss is the mean over micro-batches.
* sequence: f and P over each sequence (DeepSeek-V3's complementary sequence-wise loss); mean over the global
  batch's sequences.
* global_batch: f and P over all tokens of the optimizer step (Qiu et al. 2025, "Demons in the detail"). P is a sum
  over micro-batches, so its gradient is exact; f is only known after the last micro-batch, so micro-batch m's
  gradient uses the counts accumulated so far (micro-batches 1..m, as Megatron-LM's global aux loss does). The
  logged value is the exact global-batch loss. Counts pass through `reduce` (identity on one process; the
  all-reduce over dp/cp ranks for parallel engines).

Context parallelism splits every sequence over ranks: the micro_batch and sequence scopes then sum the choice counts
and token totals of a micro-batch's (or sequence's) shards with `reduce_shards` (the all-reduce over cp), while each
rank's P keeps only its own tokens' probabilities: the ranks' shares add up to the loss of the whole sequences, and
each rank's gradient is its tokens' part of one process's.

Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over the step's tokens of logsumexp(router logits)^2.

Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): after each applied update, every expert's selection bias
moves by `bias_update_rate` towards balance: b_i += rate * sign(mean load - load_i), the load counted over the step.

Logged (each on its own, before coefficients): moe_aux_loss, moe_z_loss; load: moe_tokens_per_expert (assignments
per expert, one list per MoE layer), moe_imbalance (max over layers of max_i load / mean load), moe_dropped_fraction
(dropped / all assignments), moe_router_entropy (mean entropy of the router probabilities, nats).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from framework.config.schema import MoEConfig
from framework.models.moe import MoE, RoutingRecord, moe_layers

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Accumulated:
    """One layer's detached sums over the step's micro-batches so far."""

    counts: torch.Tensor
    prob_sums: torch.Tensor
    z_sum: torch.Tensor
    entropy_sum: torch.Tensor
    dropped: torch.Tensor
    aux_sum: torch.Tensor
    """Sum of the micro_batch / sequence aux shares (summed over ranks: their step mean)."""
    micro_batches: int = 0

    @classmethod
    def zeros(cls, record: RoutingRecord) -> _Accumulated:
        zero = record.z_sum.detach().new_zeros(())
        counts = torch.zeros_like(record.counts[0])
        return cls(counts, torch.zeros_like(zero).expand_as(counts).clone(), zero, zero, zero.long(), zero)


def balance_loss(
    counts: torch.Tensor, prob_sums: torch.Tensor, tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """E * sum_i f_i * P_i over the last dim: f = counts / (tokens * top_k), P = prob_sums / tokens."""
    n_experts = counts.shape[-1]
    f = counts.to(prob_sums.dtype) / (tokens * top_k)
    return n_experts * (f * prob_sums / tokens).sum(dim=-1)


class MoEBalancer:
    """Accumulates one optimizer step: `start_step`, then `micro_batch_loss` after each forward, then
    `metrics` and (after an applied update) `update_bias`."""

    def __init__(
        self,
        model: nn.Module,
        moe: MoEConfig,
        reduce: Reduce | None = None,
        reduce_shards: Reduce | None = None,
    ) -> None:
        self.cfg = moe
        self.layers: dict[str, MoE] = moe_layers(model)
        self.reduce: Reduce = reduce or (lambda t: t)
        self.reduce_shards: Reduce = reduce_shards or (lambda t: t)
        self._acc: dict[str, _Accumulated] = {}
        # The step's counts over ranks, device tensors (see start_step): read by no host code.
        self._total_tokens: int | torch.Tensor = 0
        self._total_sequences: int | torch.Tensor = 0
        self._micro_batches: int | torch.Tensor = 1
        self._tokens_so_far: torch.Tensor | None = None
        self._whole_tokens: torch.Tensor | None = None
        self._reduced: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        moe: MoEConfig | None,
        reduce: Reduce | None = None,
        reduce_shards: Reduce | None = None,
    ) -> MoEBalancer | None:
        """None for a dense model (or a pipeline stage without MoE layers). reduce: sum over every rank holding
        other tokens (data and context parallel); reduce_shards: over the ranks holding other shards of the same
        sequences (context parallel)."""
        if moe is None or not moe_layers(model):
            return None
        return cls(model, moe, reduce, reduce_shards)

    def start_step(self, input_shapes: list[torch.Size]) -> None:
        """Before the step's first forward: the [B, S] shapes of its micro-batches (on this rank)."""
        device = next(iter(self.layers.values())).router.gate.weight.device
        tokens = [s.numel() for s in input_shapes]
        # One reduction per scope, and the sums stay on the device (losses divide by them; no host read): this
        # rank's tokens, sequences, micro-batches, then tokens of micro-batches 1..m (global_batch scope).
        local = [sum(tokens), sum(s[0] for s in input_shapes), len(tokens), *itertools.accumulate(tokens)]
        summed = self.reduce(torch.tensor(local, device=device))
        # every shard of a sequence (context parallel) counts its sequences and micro-batches again; [1:]: each
        # micro-batch's tokens of the whole sequences (micro_batch and sequence scopes)
        shards = self.reduce_shards(torch.tensor([1, *tokens], device=device))
        self._total_tokens = summed[0]
        self._total_sequences = summed[1] // shards[0]
        self._micro_batches = summed[2] // shards[0]
        self._tokens_so_far, self._whole_tokens = summed[3:], shards[1:]
        self._acc, self._reduced = {}, None

    def micro_batch_loss(self) -> torch.Tensor:
        """coef-weighted aux + z loss of the micro-batch just forwarded (what backward adds to the CE loss)."""
        losses = [self.layer_loss(name, layer) for name, layer in self.layers.items()]
        return torch.stack(losses).mean()

    def layer_loss(self, name: str, layer: MoE) -> torch.Tensor:
        """coef-weighted aux + z loss of one layer's micro-batch just forwarded (not averaged over layers; a
        pipeline stage adds its layers' losses itself: framework/engines/moe_pipeline.py)."""
        record = layer.last_routing
        if record is None:
            raise RuntimeError(f"MoE layer {name} has no routing record: run its forward first")
        layer.last_routing = None  # the record holds the graph: release it with the micro-batch
        acc = self._accumulate(name, record)
        aux = self._aux(record, acc)
        z = record.z_sum / self._total_tokens
        return self.cfg.aux_loss * aux + self.cfg.z_loss * z

    def _accumulate(self, name: str, record: RoutingRecord) -> _Accumulated:
        counts = record.counts.sum(dim=0)
        if self.cfg.aux_loss_scope == "global_batch":
            counts = self.reduce(
                counts
            )  # f so far enters the loss; other scopes reduce once per step (_reduce)
        acc = self._acc.setdefault(name, _Accumulated.zeros(record))
        acc.counts = acc.counts + counts
        acc.prob_sums = acc.prob_sums + record.prob_sums.detach().sum(dim=0)
        acc.z_sum = acc.z_sum + record.z_sum.detach()
        acc.entropy_sum = acc.entropy_sum + record.entropy_sum
        acc.dropped = acc.dropped + record.dropped
        acc.micro_batches += 1
        return acc

    def _aux(self, record: RoutingRecord, acc: _Accumulated) -> torch.Tensor:
        """This micro-batch's share of the step's aux loss for the configured scope."""
        k, scope, m = self.cfg.top_k, self.cfg.aux_loss_scope, acc.micro_batches - 1
        if scope == "micro_batch":
            counts, tokens = self._whole(record.counts.sum(0), m)
            share = balance_loss(counts, record.prob_sums.sum(0), tokens, k) / self._micro_batches
        elif scope == "sequence":
            counts, tokens = self._whole(record.counts, m)
            seq_len = tokens // record.counts.shape[0]
            share = balance_loss(counts, record.prob_sums, seq_len, k).sum() / self._total_sequences
        else:
            f = acc.counts / (self._step_counts(self._tokens_so_far)[m] * k)
            share = f.shape[-1] * (f * record.prob_sums.sum(0)).sum() / self._total_tokens
        acc.aux_sum = acc.aux_sum + share.detach()
        return share

    def _whole(self, counts: torch.Tensor, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Choice counts and tokens of the whole sequences this rank holds shards of (context parallel), for the
        step's micro-batch number `micro_batch`."""
        return self.reduce_shards(counts), self._step_counts(self._whole_tokens)[micro_batch]

    def _step_counts(self, counts: torch.Tensor | None) -> torch.Tensor:
        if counts is None:
            raise RuntimeError("MoEBalancer.start_step() must run before the step's first forward")
        return counts

    def metrics(self) -> dict[str, Any]:
        """The step's router losses and load metrics (one host sync)."""
        if not self._acc:
            return {}
        _, rows, counts = self.layer_stats()
        return summarize(rows, counts)

    def layer_stats(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per MoE layer that ran this step (in `layers` order): the names, [L, 4] (aux loss, z loss, router
        entropy, dropped assignments) and [L, E] assignments per expert, each over the whole step (summed over
        ranks). Collective the first time in a step (two reductions for all layers); cached until start_step."""
        if self._reduced is None:
            self._reduced = self._reduce_step()
        return self._reduced

    def _reduce_step(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        names = [name for name in self.layers if name in self._acc]
        accs = [self._acc[name] for name in names]
        # [L, 3 + E]: aux shares, z sums, entropy sums, router probability sums; [L, 1 (+ E)]: dropped (+ counts,
        # which the global_batch scope reduced already, micro-batch by micro-batch)
        floats = self.reduce(torch.stack([_float_sums(a) for a in accs]))
        local_counts = self.cfg.aux_loss_scope != "global_batch"
        longs = self.reduce(torch.stack([_long_sums(a, local_counts) for a in accs]))
        counts = longs[:, 1:] if local_counts else torch.stack([a.counts for a in accs])
        tokens = self._total_tokens
        if local_counts:
            aux = floats[:, 0]
        else:
            aux = balance_loss(counts, floats[:, 3:], tokens, self.cfg.top_k)
        rows = torch.stack(
            [aux, floats[:, 1] / tokens, floats[:, 2] / tokens, longs[:, 0].to(floats.dtype)], 1
        )
        return names, rows, counts

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: b_i += rate * sign(mean load - load_i) per MoE layer."""
        rate = self.cfg.bias_update_rate
        if rate <= 0 or not self._acc:
            return
        names, _, counts = self.layer_stats()
        for name, load in zip(names, counts.float(), strict=True):
            bias = self.layers[name].router.expert_bias
            bias.add_(rate * torch.sign(load.mean() - load))


def _float_sums(acc: _Accumulated) -> torch.Tensor:
    """[3 + E]: the aux share sum, z sum, entropy sum and router probability sums of one layer (one reduction)."""
    return torch.cat([acc.aux_sum[None], acc.z_sum[None], acc.entropy_sum[None], acc.prob_sums])


def _long_sums(acc: _Accumulated, with_counts: bool) -> torch.Tensor:
    """[1 (+ E)]: dropped assignments (and the choice counts, when not reduced already) of one layer."""
    return torch.cat([acc.dropped[None], acc.counts]) if with_counts else acc.dropped[None]


def summarize(rows: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """The logged MoE metrics from `MoEBalancer.layer_stats` rows of every MoE layer of the model (module
    docstring): losses and entropy averaged over layers, imbalance the worst layer's, dropped over all."""
    load = counts.float()
    scalars = torch.stack(
        [
            rows[:, 0].mean(),
            rows[:, 1].mean(),
            (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).max(),
            rows[:, 3].sum() / load.sum().clamp(min=1),
            rows[:, 2].mean(),
        ]
    )
    # One host read for all of it: float64 holds the fp32 scalars and the counts (< 2^53) exactly.
    values = torch.cat([scalars.double(), counts.flatten().double()]).tolist()
    names = ("moe_aux_loss", "moe_z_loss", "moe_imbalance", "moe_dropped_fraction", "moe_router_entropy")
    out: dict[str, Any] = dict(zip(names, values[: len(names)], strict=True))
    width = counts.shape[-1]
    flat = [int(v) for v in values[len(names) :]]
    out["moe_tokens_per_expert"] = [flat[i : i + width] for i in range(0, len(flat), width)]
    return out
