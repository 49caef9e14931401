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
    tokens: int = 0

    @classmethod
    def zeros(cls, record: RoutingRecord) -> _Accumulated:
        zero = record.z_sum.detach().new_zeros(())
        counts = torch.zeros_like(record.counts[0])
        return cls(counts, torch.zeros_like(zero).expand_as(counts).clone(), zero, zero, zero.long(), zero)


def balance_loss(counts: torch.Tensor, prob_sums: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
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
        self._total_tokens = 0
        self._total_sequences = 0
        self._micro_batches = 1

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
        tokens = torch.tensor(sum(s.numel() for s in input_shapes), device=device)
        sequences = torch.tensor(sum(s[0] for s in input_shapes), device=device)
        # every shard of a sequence (context parallel) counts its sequences and micro-batches again
        shards = int(self.reduce_shards(torch.ones((), device=device)))
        self._total_tokens = int(self.reduce(tokens))
        self._total_sequences = int(self.reduce(sequences)) // shards
        self._micro_batches = int(self.reduce(torch.tensor(len(input_shapes), device=device))) // shards
        self._acc = {}

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
        counts = self.reduce(record.counts.sum(dim=0))
        acc = self._acc.setdefault(name, _Accumulated.zeros(record))
        acc.counts = acc.counts + counts
        acc.prob_sums = acc.prob_sums + record.prob_sums.detach().sum(dim=0)
        acc.z_sum = acc.z_sum + record.z_sum.detach()
        acc.entropy_sum = acc.entropy_sum + record.entropy_sum
        acc.dropped = acc.dropped + record.dropped
        acc.tokens += record.tokens
        return acc

    def _aux(self, record: RoutingRecord, acc: _Accumulated) -> torch.Tensor:
        """This micro-batch's share of the step's aux loss for the configured scope."""
        k, scope = self.cfg.top_k, self.cfg.aux_loss_scope
        if scope == "micro_batch":
            counts, tokens = self._whole(record.counts.sum(0), record.tokens)
            share = balance_loss(counts, record.prob_sums.sum(0), tokens, k) / self._micro_batches
        elif scope == "sequence":
            counts, tokens = self._whole(record.counts, record.tokens)
            seq_len = tokens // record.counts.shape[0]
            share = balance_loss(counts, record.prob_sums, seq_len, k).sum() / self._total_sequences
        else:
            tokens_so_far = int(self.reduce(torch.tensor(acc.tokens, device=acc.counts.device)))
            f = acc.counts / (tokens_so_far * k)
            share = f.shape[-1] * (f * record.prob_sums.sum(0)).sum() / self._total_tokens
        acc.aux_sum = acc.aux_sum + share.detach()
        return share

    def _whole(self, counts: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """Choice counts and tokens of the whole sequences this rank holds shards of (context parallel)."""
        whole = self.reduce_shards(torch.tensor(tokens, device=counts.device))
        return self.reduce_shards(counts), int(whole)

    def _aux_value(self, acc: _Accumulated) -> torch.Tensor:
        if self.cfg.aux_loss_scope != "global_batch":
            return self.reduce(acc.aux_sum)
        return balance_loss(acc.counts, self.reduce(acc.prob_sums), self._total_tokens, self.cfg.top_k)

    def metrics(self) -> dict[str, Any]:
        """The step's router losses and load metrics (one host sync)."""
        if not self._acc:
            return {}
        _, rows, counts = self.layer_stats()
        return summarize(rows, counts)

    def layer_stats(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per MoE layer that ran this step (in `layers` order): the names, [L, 4] (aux loss, z loss, router
        entropy, dropped assignments) and [L, E] assignments per expert, each over the whole step (summed over
        ranks)."""
        names = [name for name in self.layers if name in self._acc]
        accs = [self._acc[name] for name in names]
        reduce, tokens = self.reduce, self._total_tokens
        rows = [
            torch.stack(
                [
                    self._aux_value(a),
                    reduce(a.z_sum) / tokens,
                    reduce(a.entropy_sum) / tokens,
                    reduce(a.dropped).to(a.z_sum.dtype),
                ]
            )
            for a in accs
        ]
        return names, torch.stack(rows), torch.stack([a.counts for a in accs])

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: b_i += rate * sign(mean load - load_i) per MoE layer."""
        rate = self.cfg.bias_update_rate
        if rate <= 0:
            return
        for name, layer in self.layers.items():
            acc = self._acc.get(name)
            if acc is None:
                continue
            load = acc.counts.float()
            layer.router.expert_bias.add_(rate * torch.sign(load.mean() - load))


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
    ).tolist()
    names = ("moe_aux_loss", "moe_z_loss", "moe_imbalance", "moe_dropped_fraction", "moe_router_entropy")
    out: dict[str, Any] = dict(zip(names, scalars, strict=True))
    out["moe_tokens_per_expert"] = counts.long().tolist()
    return out
