"""Functions the sharded-checkpoint tests run on every rank ('dist_cases_ckpt:name')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_cases import tiny_recipe
from torch.distributed.tensor import DTensor

from framework.config.loader import recipe_to_dict
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model


def save_sharded(directory: str, parallel: dict[str, Any], model: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every rank writes its DTensor shards of a parallelized tiny model under 'model/<name>' with DCP, rank 0 the
    meta.json and COMPLETE marker of a Loom checkpoint; returns the whole tensors, gathered through collectives
    (the reference a consolidation must reproduce)."""
    recipe = tiny_recipe(model, **parallel)
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    built = build_parallel_model(recipe, dims, build_mesh(dims, "cpu"), torch.device("cpu"))
    state = built.state_dict()
    assert any(isinstance(t, DTensor) for t in state.values())  # the checkpoint really is sharded
    dcp.save({f"model/{k}": v for k, v in state.items()}, checkpoint_id=directory)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}
    if dist.get_rank() == 0:
        meta = {"format_version": 1, "step": 4, "tokens": 256, "layout": parallel, "state": {},
                "recipe": recipe_to_dict(recipe)}  # fmt: skip
        (Path(directory) / "meta.json").write_text(json.dumps(meta))
        (Path(directory) / "COMPLETE").write_text(json.dumps({"step": 4}))
    dist.barrier()
    return full
