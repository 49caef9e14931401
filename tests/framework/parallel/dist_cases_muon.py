"""Muon parity cases run on every rank of a `DistPool` ('dist_cases_muon:name'): a layout built as `loom train`
builds it (meta model, parallelize, sharded init, the engine train_module_for picks) against one process in the
same worker, both with optim.name muon."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, full_params, global_batches, tiny_recipe
from dist_cases_pp import regroup

from framework.engines.build import train_module_for
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.muon import MuonAdamW
from framework.train.train_module import Batch, TrainModule


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _train(module: TrainModule, batches: list[list[Batch]]) -> tuple[list[float], list[float], list[int]]:
    """dist_cases.train_steps, also returning each step's QK-clip count (optim.qk_clip; 0 without)."""
    losses, norms, clipped = [], [], []
    for micro_batches in batches:
        module.train_batch(micro_batches)
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
        clipped.append(stats.get("qk_clipped_heads", 0))
    return losses, norms, clipped


def muon_parity(
    steps: int,
    parallel: dict[str, Any],
    model: dict[str, Any] | None = None,
    micro_batch: int = 1,
    seed: int = 0,
    optim: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`steps` Muon steps in this layout and on one process; differences of the losses, gradient norms and of the
    parameters this rank holds, how many of the sharded matrices this rank iterated, and the heads QK-clip clipped
    per step in both runs (`optim`: more optim.* settings, e.g. qk_clip)."""
    recipe = tiny_recipe(model, **parallel)
    recipe.optim.name, recipe.train.micro_batch_size, recipe.train.seed = "muon", micro_batch, seed
    for key, value in (optim or {}).items():
        setattr(recipe.optim, key, value)
    data = global_batches(steps)
    cpu = torch.device("cpu")
    reference = TrainModule(materialize_model(recipe.model, cpu, seed), recipe, "cpu")
    ref_losses, ref_norms, ref_clipped = _train(reference, data)

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    module = train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    mine = [regroup(b[rank * per_rank : (rank + 1) * per_rank], micro_batch) for b in data]
    losses, norms, clipped = _train(module, mine)

    ref_params, params = full_params(reference.model), full_params(module.model)
    rel = {n: _rel(p, ref_params[n]) for n, p in params.items()}
    optimizer = module.optimizer
    assert isinstance(optimizer, MuonAdamW)
    sharded = [layout for layout in optimizer.layouts.values() if layout is not None]
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(rel.values()),
        "worst_param": max(rel, key=rel.__getitem__),
        "names_subset": set(params) <= set(ref_params),
        "muon_matrices": len(optimizer.layouts),
        "sharded": len(sharded),
        "owned": sum(layout.mine for layout in sharded),
        "clipped": clipped,
        "ref_clipped": ref_clipped,
        "moved": max(rel[n] for n in params if n in rel) > 0 and _moved(reference, ref_params),
    }


def _moved(reference: TrainModule, params: dict[str, torch.Tensor]) -> bool:
    """The reference's Muon matrices really changed (the comparison is not of untouched weights)."""
    first = materialize_model(reference.recipe.model, torch.device("cpu"), reference.recipe.train.seed)
    start = dict(first.named_parameters())
    muon = [
        n for g in reference.optimizer.param_groups if g["algorithm"] == "muon" for n in _names(reference, g)
    ]
    return bool(muon) and all(_rel(params[n], start[n].detach()) > 1e-3 for n in muon)


def _names(module: TrainModule, group: dict[str, Any]) -> list[str]:
    names = {id(p): n for n, p in module.model.named_parameters()}
    return [names[id(p)] for p in group["params"]]
