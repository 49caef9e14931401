"""Functions the distributed tests run on every rank of a `DistPool` (by import path 'dist_cases:name')."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from framework.config import ModelConfig, ParallelConfig, Recipe
from framework.engines.native import DistributedTrainModule
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.parallelize import parallelize
from framework.run import materialize_model
from framework.train.train_module import Batch, TrainModule


def rank_sum() -> tuple[int, float]:
    """(rank, sum of ranks over the group): proves the group works."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank one failed on purpose")
    return dist.get_rank()


# -- parity of a parallel layout against one process -----------------------------------------------------------

VOCAB, SEQ, GLOBAL_BATCH = 64, 16, 4


def tiny_recipe(model_overrides: dict[str, Any] | None = None, **parallel: Any) -> Recipe:
    """A 2-block decoder, fp32, dropout 0, clipping active, constant LR; every rank builds it from the seed."""
    sizes = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=SEQ)
    model = ModelConfig(**sizes | (model_overrides or {}))
    recipe = Recipe(model=model, parallel=ParallelConfig(**parallel))
    recipe.data.seq_len = SEQ
    recipe.train.global_batch_size, recipe.train.micro_batch_size = GLOBAL_BATCH, 1
    # clip well below the norm so clipping really runs. lr 1e-3: Adam moves every weight by ~lr per step whatever
    # its gradient, so a parameter whose true gradient is ~0 (a norm bias, the key bias) follows the sign of
    # rounding noise; at lr 1e-2 that alone was 4e-4 relative after 5 steps (0.02-std weights), at 1e-3 a tenth.
    recipe.optim.lr, recipe.optim.grad_clip = 1e-3, 0.5
    recipe.schedule.name, recipe.schedule.warmup_steps = "constant", 0
    return recipe


def global_batches(steps: int) -> list[list[Batch]]:
    """Per step, the global batch as GLOBAL_BATCH micro-batches of one sample (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=g)
    return [[{"input_ids": s[None, :-1], "labels": s[None, 1:]} for s in step] for step in tokens]


def train_steps(module: TrainModule, batches: list[list[Batch]]) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for micro_batches in batches:
        module.train_batch(micro_batches)
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
    return losses, norms


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def parity(steps: int, parallel: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `steps` steps in this layout and, in the same process, on one process; report the differences."""
    recipe = tiny_recipe(model, **parallel)
    batches = global_batches(steps)
    reference = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    ref_losses, ref_norms = train_steps(reference, batches)

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    model = parallelize(materialize_model(recipe.model, torch.device("cpu"), 0), dims, mesh, recipe)
    module = DistributedTrainModule(model, recipe, "cpu", dims, mesh)
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    losses, norms = train_steps(module, [b[rank * per_rank : (rank + 1) * per_rank] for b in batches])

    ref_params, params = full_params(reference.model), full_params(module.model)
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(((params[n] - p).norm() / p.norm()).item() for n, p in ref_params.items()),
        "names_equal": list(params) == list(ref_params),
    }
