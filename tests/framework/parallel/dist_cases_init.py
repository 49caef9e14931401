"""Functions the meta-build / sharded-init and sharded-validation tests run on every rank ('dist_cases_init:name')."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, full_params, global_batches, tiny_recipe, train_steps
from torch.distributed.tensor import DTensor

from framework.engines.native import DistributedTrainModule
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.callbacks.validation import Validation
from framework.train.train_module import TrainModule

CPU = torch.device("cpu")


def _layout(parallel: dict[str, Any], model: dict[str, Any] | None) -> tuple[Any, ParallelDims, Any]:
    recipe = tiny_recipe(model, **parallel)
    if recipe.parallel.pp > 1:
        recipe.train.micro_batch_size = 2  # split into pp_microbatches (default: pp) pipeline micro-batches
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    return recipe, dims, build_mesh(dims, "cpu")


def _dp_rank(dims: ParallelDims, mesh: Any) -> int:
    return mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()


def init_vs_one_process(parallel: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Meta build + parallelize + to_empty + sharded init, gathered back to whole tensors, against
    `materialize_model` (one process, plain tensors). A pipeline rank holds only some of the names."""
    recipe, dims, mesh = _layout(parallel, model)
    built = build_parallel_model(recipe, dims, mesh, CPU)
    reference = materialize_model(recipe.model, CPU, recipe.train.seed)
    got, want = full_params(built), full_params(reference)
    got_buffers = {n: _full(b) for n, b in built.named_buffers()}
    want_buffers = dict(reference.named_buffers())
    return {
        "names": list(got),
        "all_names": list(want),
        "names_equal": list(got) == list(want) and list(got_buffers) == list(want_buffers),
        # a pipeline rank: the full model's names, in the full model's order, minus what it does not own
        "names_in_order": list(got) == [n for n in want if n in got],
        "unequal": [n for n in got if not torch.equal(got[n], want[n])]
        + [n for n in got_buffers if not torch.equal(got_buffers[n], want_buffers[n])],
        "dtensors": sum(isinstance(p, DTensor) for p in built.parameters()),
        "local_numel": sum(_local(p).numel() for p in built.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
        "buffers": list(want_buffers),
    }


def parity_meta_built(
    steps: int, parallel: dict[str, Any], model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """dist_cases.parity, but the parallel model is built by `build_parallel_model` (meta, then sharded init)."""
    recipe, dims, mesh = _layout(parallel, model)
    batches = global_batches(steps)
    reference = TrainModule(materialize_model(recipe.model, CPU, recipe.train.seed), recipe, "cpu")
    ref_losses, ref_norms = train_steps(reference, batches)

    module = DistributedTrainModule(build_parallel_model(recipe, dims, mesh, CPU), recipe, "cpu", dims, mesh)
    per_rank, rank = GLOBAL_BATCH // dims.dp, _dp_rank(dims, mesh)
    losses, norms = train_steps(module, [b[rank * per_rank : (rank + 1) * per_rank] for b in batches])
    ref_params, params = full_params(reference.model), full_params(module.model)
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(((params[n] - p).norm() / p.norm()).item() for n, p in ref_params.items()),
        "names_equal": list(params) == list(ref_params),
    }


class _Trainer:
    """What Validation.run needs of a Trainer: the module, the step and emit."""

    def __init__(self, module: Any) -> None:
        self.train_module, self.step = module, 0

    def emit(self, hook: str, metrics: dict[str, Any]) -> None:
        pass


class _CountingModule:
    """Counts the forwards of `module.eval_batch` (the compute validation costs this rank)."""

    def __init__(self, module: TrainModule) -> None:
        self.module, self.device, self.forwards = module, module.device, 0

    def eval_batch(self, batch: Any) -> Any:
        self.forwards += 1
        return self.module.eval_batch(batch)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.module.global_sum(value)


def sharded_validation(
    parallel: dict[str, Any], num_batches: int, available: int, model: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validation over `available` held-out batches (at most `num_batches` used), split over the dp ranks of this
    layout, against the same callback on one process."""
    recipe, dims, mesh = _layout(parallel, model)
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, recipe.model.vocab_size, (available, 2, recipe.data.seq_len + 1), generator=g)
    labels = tokens[:, :, 1:].clone()
    labels[:, 1, -5:] = -100  # uneven labelled-token counts per batch
    batches = [{"input_ids": t[:, :-1], "labels": lab} for t, lab in zip(tokens, labels, strict=True)]

    reference = TrainModule(materialize_model(recipe.model, CPU, recipe.train.seed), recipe, "cpu")
    want = Validation(batches, every=0, num_batches=num_batches).run(_Trainer(reference))

    module = DistributedTrainModule(build_parallel_model(recipe, dims, mesh, CPU), recipe, "cpu", dims, mesh)
    counting = _CountingModule(module)
    callback = Validation(
        batches, every=0, num_batches=num_batches, dp_rank=_dp_rank(dims, mesh), dp_size=dims.dp
    )
    got = callback.run(_Trainer(counting))
    return {"got": got, "want": want, "forwards": counting.forwards}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
