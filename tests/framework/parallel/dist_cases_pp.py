"""Pipeline-parallel cases the distributed tests run on every rank of a `DistPool` ('dist_cases_pp:name')."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import full_params, global_batches, tiny_recipe

from framework.config import Recipe
from framework.engines.build import train_module_for
from framework.engines.pipeline import PipelineTrainModule
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.train_module import Batch, TrainModule


def regroup(micro_batches: list[Batch], size: int) -> list[Batch]:
    """Concatenate one-sample micro-batches into micro-batches of `size` samples."""
    groups = [micro_batches[i : i + size] for i in range(0, len(micro_batches), size)]
    return [{k: torch.cat([b[k] for b in group]) for k in group[0]} for group in groups]


def pp_recipe(parallel: dict[str, Any], model: dict[str, Any] | None, micro_batch: int) -> Recipe:
    recipe = tiny_recipe({"n_layers": 4} | (model or {}), **parallel)
    recipe.train.micro_batch_size = micro_batch
    return recipe


def build_pipeline_module(recipe: Recipe) -> PipelineTrainModule:
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    model = build_parallel_model(recipe, dims, mesh, torch.device("cpu"))  # the path `loom train` takes
    module = train_module_for(model, recipe, torch.device("cpu"), dims, mesh)
    assert isinstance(module, PipelineTrainModule)
    return module


def with_documents(batches: list[list[Batch]]) -> list[list[Batch]]:
    """Two documents per sample (ids 0 | 1 at mid-sequence): masks and positions then depend on a keyword input
    that every pipeline stage must receive."""

    def add(b: Batch) -> Batch:
        seq = b["input_ids"].shape[1]
        return b | {"document_ids": (torch.arange(seq) >= seq // 2).long()[None]}

    return [[add(b) for b in step] for step in batches]


def _train(
    module: TrainModule, batches: list[list[Batch]]
) -> tuple[list[float], list[float], dict[str, float]]:
    """dist_cases.train_steps, also returning the multi-token prediction losses (model.mtp) of every step."""
    losses, norms, mtp = [], [], {}
    for micro_batches in batches:
        module.train_batch(micro_batches)
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
        mtp |= {f"{k}@{len(losses)}": v for k, v in stats.items() if k.startswith("mtp_")}
    return losses, norms, mtp


def pp_parity(
    steps: int,
    parallel: dict[str, Any],
    model: dict[str, Any] | None = None,
    micro_batch: int = 2,
    documents: bool = False,
) -> dict[str, Any]:
    """Train `steps` steps in this pipeline layout and on one process (in this process); report differences of the
    per-step loss and gradient norm, and of the parameters this rank holds."""
    recipe = pp_recipe(parallel, model, micro_batch)
    batches = global_batches(steps)
    if documents:
        batches = with_documents(batches)
    reference = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    ref_losses, ref_norms, ref_mtp = _train(reference, batches)

    module = build_pipeline_module(recipe)
    dims, mesh = module.dims, module.mesh
    per_rank = len(batches[0]) // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    mine = [regroup(b[rank * per_rank : (rank + 1) * per_rank], micro_batch) for b in batches]
    losses, norms, mtp = _train(module, mine)
    eval_ce, eval_n = module.eval_batch(regroup(batches[0], micro_batch)[0])
    ref_ce, ref_n = reference.eval_batch(regroup(batches[0], micro_batch)[0])

    ref_params, params = full_params(reference.model), full_params(module.model)
    return {
        "stages": module.parts.stage_ids,
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(
            ((p - ref_params[n]).norm() / ref_params[n].norm()).item() for n, p in params.items()
        ),
        "eval_rel": abs(eval_ce.item() - ref_ce.item()) / ref_ce.item(),
        # the last step's multi-token prediction losses (model.mtp), the same on every rank
        "mtp_rel": {k: abs(v - ref_mtp[k]) / abs(ref_mtp[k]) for k, v in mtp.items()},
        "mtp_keys_equal": set(mtp) == set(ref_mtp),
        "eval_tokens_equal": int(eval_n) == int(ref_n),
        "names_subset": set(params) <= set(ref_params),
        "names": sorted(params),
    }
