"""The torch-native multi-process engine: `TrainModule` with its three parallel seams filled in over a DeviceMesh.

Gradient semantics: each rank's loss is its share of the *global* mean (normalised by the global labelled-token
count), so the true gradient is the SUM of the ranks' gradients. DDP and FSDP2 average instead, so the loss is
multiplied by the data-parallel size first (exact for power-of-two sizes).

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
from framework.parallel.dims import ParallelDims
from framework.train.loss import LossOutput
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

    def _forward_loss(self, batch: Batch, total_labelled: torch.Tensor) -> LossOutput:
        out = super()._forward_loss(batch, total_labelled)
        out.loss = out.loss * self.dims.dp  # DDP/FSDP average the gradients; we want their sum
        return out

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every data-parallel dimension (tp/pp ranks hold the same counts, so they are not summed)."""
        value = value.clone()
        for name in DP_DIMS:
            if self.mesh[name].size() > 1:
                dist.all_reduce(value, group=self.mesh[name].get_group())
        return value

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients only on the last micro-batch of a step (replicate and FSDP2 both offer the switch)."""
        if self.dims.dp > 1:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """The norm over the whole model: a sharded (DTensor) norm is reduced over its mesh by full_tensor();
        DDP gradients are already identical on every rank after their all-reduce."""
        norm = super()._grad_norm()
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm
