"""fp8 (torchao, emulated on CPU) under FSDP2 and TP, run on every rank of a `DistPool` ('dist_cases_fp8:name')."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import global_batches, tiny_recipe
from dist_cases_numerics import rank_slice, rel
from dist_cases_pp import regroup

from framework.config import Recipe
from framework.engines.build import train_module_for
from framework.kernels.fp8 import apply_fp8, float8_linear_names
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.train_module import TrainModule


def fp8_tracks_one_process(parallel: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """The layout built as `loom train` builds it (fp8 conversion on the meta model, then TP / FSDP2) against one
    fp8 process and one bf16 process over `steps` steps."""
    recipe = tiny_recipe({"n_layers": 3}, **parallel)  # 3 blocks: the middle one is converted
    recipe.precision.dtype = "fp8"
    batches = global_batches(steps)
    cpu = torch.device("cpu")
    ref = TrainModule(apply_fp8(materialize_model(recipe.model, cpu, 0), recipe.precision, cpu), recipe, cpu)
    ref_losses = [_loss(ref, b) for b in batches]
    pipelined = recipe.parallel.pp > 1
    if pipelined:  # a pipeline splits each micro-batch into pp_microbatches (= stages) of >= 1 sample
        recipe.train.micro_batch_size = 2
    module = _build(recipe)
    mine = [regroup(b, 2) if pipelined else rank_slice(module, b) for b in batches]
    losses = [_loss(module, b) for b in mine]
    recipe.precision.dtype = "bf16"
    bf16 = TrainModule(materialize_model(recipe.model, cpu, 0), recipe, cpu)
    return {
        "converted": float8_linear_names(module.model),
        "loss_rel": rel(losses, ref_losses),
        "bf16_rel": rel(losses, [_loss(bf16, b) for b in batches]),
    }


def _loss(module: TrainModule, batch: list) -> float:
    module.train_batch(batch)
    return module.optim_step()["loss"]


def _build(recipe: Recipe) -> TrainModule:
    """As `loom train --nproc N` builds it: parallelized on meta, shards initialised, the engine for the layout
    (the pipeline engine when pp > 1)."""
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    cpu = torch.device("cpu")
    return train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
