"""Pick the engine for a parallelized model: the pipeline engine when the layout has pipeline stages."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.config import Recipe
from framework.engines.native import DistributedTrainModule
from framework.engines.pipeline import PipelineTrainModule
from framework.parallel.dims import ParallelDims
from framework.parallel.parallelize import pipeline_parts


def train_module_for(
    model: nn.Module, recipe: Recipe, device: torch.device, dims: ParallelDims, mesh: DeviceMesh
) -> DistributedTrainModule:
    """`model` has been through `parallelize(model, dims, mesh, recipe)` (and initialised)."""
    parts = pipeline_parts(model)
    if parts is not None:
        return PipelineTrainModule(model, recipe, device, dims, mesh, parts)
    return DistributedTrainModule(model, recipe, device, dims, mesh)
