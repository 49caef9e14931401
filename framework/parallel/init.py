"""Initialise a model that was laid out over a mesh while still on the meta device.

The distributed build is: build on meta -> parallelize (TP plans and FSDP2 only rewrite meta parameters into meta
DTensors) -> `to_empty` (each rank allocates only its own shards) -> `init_sharded_weights`. Each tensor's whole
value comes from framework/models/init.py (a function of seed and parameter name only), and each rank keeps the
part its placements give it. Every rank computes the same whole tensor, so no communication is needed
(`distribute_tensor(..., src_data_rank=None)` only slices), and the result equals the one-process init bitwise
whatever the layout: FSDP2 Shard(0), strided FSDP2 x TP shards, TP Shard(0)/Shard(1), replicated parameters.

Nothing here knows a parallel plan: it reads each parameter's own mesh and placements.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from framework.config.schema import ModelConfig
from framework.models.init import initial_values


@torch.no_grad()
def init_sharded_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter (and MoE selection-bias buffer) of `model` in place, plain tensors and DTensors
    alike. `model` may be any module whose parameter names are the full model's (a pipeline stage too): only the
    tensors it holds are touched. Peak extra memory: one whole tensor on the CPU plus one on the device."""
    for name, tensor, value in initial_values(model, cfg, seed):
        if isinstance(tensor, DTensor):
            _copy_local_shard(name, tensor, value)
        else:
            tensor.copy_(value)


def _copy_local_shard(name: str, tensor: DTensor, value: torch.Tensor) -> None:
    # Copy into the existing local tensor rather than replace the parameter: FSDP2 keeps references to it (and
    # re-pads it into its own storage at lazy init), and the optimizer may already hold the parameter.
    shard = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
    local = tensor.to_local()
    if local.shape != shard.shape:
        raise RuntimeError(
            f"{name}: local shard {tuple(local.shape)} but placements {tensor.placements} give "
            f"{tuple(shard.shape)}"
        )
    local.copy_(shard)
