"""The torch-native multi-process engine: `TrainModule` with its three parallel seams filled in over a DeviceMesh.

Gradient semantics: each rank's loss is its share of the *global* mean (normalised by the global labelled-token
count), so the true gradient is the SUM of the ranks' gradients. DDP and FSDP2 average instead, so the loss is
multiplied by the number of ranks they average over first: data-parallel x context-parallel ranks (cp ranks hold
replicated parameters whose gradients cover their own tokens; framework/parallel/context.py). Exact for
power-of-two sizes.

Every rank ends a step with the same loss sums and the same global gradient norm, so the skip decision (non-finite,
spikes) is the same function of the same numbers on every rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from framework.config import Recipe
from framework.parallel.context import shard_batch
from framework.parallel.dims import ParallelDims
from framework.parallel.rng import seed_for_rank
from framework.parallel.tensor import loss_context
from framework.train.loss import LossOutput
from framework.train.precision import Precision
from framework.train.train_module import Batch, TrainModule

DP_DIMS = ("dp_replicate", "dp_shard")


class DistributedTrainModule(TrainModule):
    """`model` has been through `parallelize(model, dims, mesh, recipe)`."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        device: torch.device | str,
        dims: ParallelDims,
        mesh: DeviceMesh,
    ) -> None:
        self.dims = dims
        self.mesh = mesh  # set before TrainModule.__init__: the MoE balancer binds _global_sum there
        super().__init__(model, recipe, device)
        # dropout: independent masks per data-parallel rank, identical across tp peers (framework/parallel/rng.py)
        self.rng_seed = seed_for_rank(recipe.train.seed, mesh)
        # fp16: every rank takes the same overflow decision and keeps the same loss scale
        self.precision = Precision(recipe.precision, self.device, process_group=dist.group.WORLD)

    def _forward_loss(self, batch: Batch, total_labelled: torch.Tensor) -> LossOutput:
        out = super()._forward_loss(batch, total_labelled)
        # DDP/FSDP average the gradients over dp x cp ranks; we want their sum
        out.loss = out.loss * self.dims.dp * self.dims.cp
        return out

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every data-parallel dimension and cp (each cp rank counts its sequence shard); tp/pp ranks
        hold the same counts, so they are not summed."""
        return _sum_over(value, self.mesh, (*DP_DIMS, "cp"))

    def _shard_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over cp: the ranks holding the other sequence shards of this rank's samples."""
        return _sum_over(value, self.mesh, ("cp",))

    def _world_max(self, value: torch.Tensor) -> None:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Validation's sums: eval_batch already returns its batch's whole-sequence sums on every cp peer (as tp
        and pp peers do), so only the data-parallel ranks are added (its batch counts stay counts)."""
        return _sum_over(value, self.mesh, DP_DIMS)

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Which gradient reductions this micro-batch's backward runs. The returned context wraps the
        micro-batch's forward and backward: with vocab-sharded logits it is loss_parallel, which must be active
        for both.

        DDP all-reduces only on the last micro-batch: every rank holds whole gradients anyway. FSDP2 and HSDP
        reduce-scatter every micro-batch (as torchtitan does), so between micro-batches a rank keeps only its
        1/dp_shard gradient shard in fp32; skipping the reduce-scatter would keep each rank's whole unsharded
        fp32 gradient until the last one (about 32 GB per rank for llama-8b). HSDP defers only the all-reduce
        over dp_replicate to the last micro-batch: it moves shards, which are already small."""
        if self.dims.dp * self.dims.cp > 1:  # FSDP2/DDP also run over cp (context.data_parallel_mesh)
            if self.dims.data_parallel == "ddp":
                self.model.set_requires_gradient_sync(last)
            else:
                self.model.set_requires_all_reduce(last)
        return loss_context(self.dims, self.recipe)

    def _to_device(self, batch: Batch) -> Batch:
        """Training and evaluation batches: with cp, this rank's sequence shard (framework/parallel/context.py).
        The token counters then count the shard: the tokens this rank computed."""
        return shard_batch(super()._to_device(batch), self.mesh["cp"], self.dims)

    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with loss_context(self.dims, self.recipe):  # the head's logits may be sharded over the vocabulary
            ce_sum, labelled = super().eval_batch(batch)
        # with cp: each rank scored its sequence shard; return the batch's sums, the same on every cp peer
        return _sum_over(ce_sum, self.mesh, ("cp",)), _sum_over(labelled, self.mesh, ("cp",))

    def _grad_norm(self) -> torch.Tensor:
        """The norm over the whole model. Gradients live on up to three kinds of layout at once (plain replicated
        tensors, DTensors on the tp mesh, DTensors on the dp or dp x tp mesh) and torch cannot stack norms across
        them, so each layout's norm is taken by itself, reduced over its mesh by full_tensor(), then combined.
        Replicated gradients are identical on every rank (DDP's all-reduce, TP's backward all-reduces)."""
        return _nonfinite_anywhere(self._local_norm())

    def _local_norm(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The norm over this rank's gradients (each layout reduced over its mesh), leaving out parameter `skip`."""
        groups = [[p.grad for p in params if p is not skip] for params in self._params_by_layout()]
        norms = [_full(torch.nn.utils.get_total_norm(g, error_if_nonfinite=False)) for g in groups if g]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)

    def _clip_grads(self, clip: float, norm: torch.Tensor) -> None:
        # torch's foreach kernels refuse a list mixing plain tensors and DTensors: scale each layout by itself.
        for params in self._params_by_layout():
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)

    def _params_by_layout(self) -> list[list[torch.Tensor]]:
        """The parameters that have a gradient, grouped by their gradient's mesh (None: plain tensors)."""
        groups: dict[DeviceMesh | None, list[torch.Tensor]] = {}
        for p in self._params:
            if p.grad is not None:
                key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                groups.setdefault(key, []).append(p)
        return list(groups.values())


def _sum_over(value: torch.Tensor, mesh: DeviceMesh, names: tuple[str, ...]) -> torch.Tensor:
    """`value` all-reduced (summed) over each named mesh dimension larger than 1; a new tensor."""
    value = value.clone()
    for name in names:
        if mesh[name].size() > 1:
            dist.all_reduce(value, group=mesh[name].get_group())
    return value


def _nonfinite_anywhere(norm: torch.Tensor) -> torch.Tensor:
    """`norm`, or NaN when any rank's norm is not finite: the skip decision must be one decision.
    Plain replicated gradients (DDP after its all-reduce, norms and embeddings under TP) are normed on each rank
    alone, so a fault that corrupts one rank's copy (a bad device, a NaN written after the all-reduce) would
    otherwise skip the step there and apply it elsewhere, and the replicas would silently diverge. One scalar
    all-reduce over the whole world per step."""
    bad = (~torch.isfinite(norm)).float()
    dist.all_reduce(bad)
    return torch.where((bad > 0) & torch.isfinite(norm), torch.full_like(norm, float("nan")), norm)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
