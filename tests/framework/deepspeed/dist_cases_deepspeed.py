"""DeepSpeed-engine cases run on every rank of a `DistPool` ('dist_cases_deepspeed:name')."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, full_params, global_batches, tiny_recipe, train_steps
from dist_cases_numerics import rel

from framework.config import Recipe
from framework.deepspeed.config import import_deepspeed
from framework.deepspeed.engine import DeepSpeedTrainModule
from framework.run import materialize_model
from framework.train.train_module import TrainModule

CPU = torch.device("cpu")


def ds_recipe(stage: int, offload: bool, model: dict[str, Any] | None = None) -> Recipe:
    recipe = tiny_recipe(model)
    recipe.parallel.engine = "deepspeed"
    recipe.deepspeed.zero_stage = stage
    if offload:
        recipe.deepspeed.offload_optimizer = "cpu"
        recipe.deepspeed.offload_params = "cpu" if stage == 3 else "none"
    return recipe


def zero_parity(
    stage: int, offload: bool = False, steps: int = 5, cp: int = 1, model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`steps` steps on the DeepSpeed engine (this rank's slice of each global batch; with cp > 1 a block of cp
    ranks shares a slice and splits its sequences, DeepSpeed-Ulysses) against one native process (in this
    process): per-step loss and gradient norm, and the parameters after the last update."""
    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # torchrun sets it; DeepSpeed insists on it
    recipe = ds_recipe(stage, offload, model)
    recipe.parallel.cp = cp
    batches = global_batches(steps)
    ref = TrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)
    ref_losses, ref_norms = train_steps(ref, batches)
    module = DeepSpeedTrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)
    per_rank = GLOBAL_BATCH // (dist.get_world_size() // cp)
    dp_rank = dist.get_rank() // cp
    losses, norms = train_steps(module, [b[dp_rank * per_rank : (dp_rank + 1) * per_rank] for b in batches])
    ours, theirs = _gathered(module), full_params(ref.model)
    return {
        "loss_rel": rel(losses, ref_losses),
        "norm_rel": rel(norms, ref_norms),
        "param_rel": max(((ours[n] - p).norm() / p.norm()).item() for n, p in theirs.items()),
        "losses": losses,
        "grad_accumulation": module.engine.gradient_accumulation_steps(),
        "partitioned": _partitioned(module),
    }


def _gathered(module: DeepSpeedTrainModule) -> dict[str, torch.Tensor]:
    """Whole parameters (ZeRO-3 holds a partition of each: gather it)."""
    deepspeed = import_deepspeed(CPU)
    params = list(module.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.engine.module.named_parameters()}


def _partitioned(module: DeepSpeedTrainModule) -> bool:
    """Whether ZeRO-3 really partitioned the parameters (each rank holds fewer elements than the model)."""
    return any(getattr(p, "ds_numel", 0) > p.numel() for p in module.engine.module.parameters())


def fp16_tracks_native(stage: int, scale_init: float, steps: int = 5) -> dict[str, Any]:
    """fp16 on DeepSpeed (its fp16 mode: fp16 weights, fp32 master, its dynamic loss scaler) against one native
    fp16 process (autocast, fp32 weights, GradScaler) and one fp32 process: losses, skipped steps, loss scales."""
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    recipe = ds_recipe(stage, False)
    recipe.precision.dtype, recipe.precision.loss_scale_init = "fp16", scale_init
    batches = global_batches(steps)
    ref = TrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)
    ref_stats = [_step(ref, b) for b in batches]
    module = DeepSpeedTrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    rank = dist.get_rank()
    stats = [_step(module, b[rank * per_rank : (rank + 1) * per_rank]) for b in batches]
    recipe.precision.dtype = "fp32"
    fp32 = [
        _step(TrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU), b)["loss"]
        for b in batches[:1]
    ]
    return {
        "loss_rel": rel([s["loss"] for s in stats], [s["loss"] for s in ref_stats]),
        "skipped": [s["skipped"] for s in stats],
        "native_skipped": [s["skipped"] for s in ref_stats],
        "scales": [s["loss_scale"] for s in stats],
        "native_scales": [s["loss_scale"] for s in ref_stats],
        "first_vs_fp32": abs(stats[0]["loss"] - fp32[0]) / fp32[0],
        "weight_dtype": str(next(module.engine.module.parameters()).dtype),
    }


def _step(module: TrainModule, batch: list) -> dict[str, Any]:
    module.train_batch(batch)
    return module.optim_step()


def zero_resume(stage: int, offload: bool, folder: str) -> dict[str, Any]:
    """4 steps straight vs 2 steps, DeepSpeed's save into `folder`, a fresh engine loading it, 2 more steps."""
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    recipe = ds_recipe(stage, offload)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    rank = dist.get_rank()
    mine = [b[rank * per_rank : (rank + 1) * per_rank] for b in global_batches(4)]

    def fresh() -> DeepSpeedTrainModule:
        return DeepSpeedTrainModule(materialize_model(recipe.model, CPU, 0), recipe, CPU)

    straight = train_steps(fresh(), mine)[0]
    first = fresh()
    before = train_steps(first, mine[:2])[0]
    first.save_engine_files(Path(folder))
    state = first.state_dict()
    second = fresh()
    second.load_engine_files(Path(folder))
    second.load_state_dict(state)
    return {"straight": straight, "resumed": before + train_steps(second, mine[2:])[0], "step": second.step}
