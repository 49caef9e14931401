"""Pipeline parallelism with `torch.distributed.pipelining`: split a model into stages, run a schedule per step.

Splitting. The model's blocks live in `layers` ModuleDicts and the model's forward already skips what is missing
(no `tok_embeddings`: the input is hidden states; no head: it returns hidden states). A pipeline rank therefore keeps
*one* model object — the full model with every module it does not own deleted — so parameter names are the full
model's names in every layout (checkpoints, name-seeded init and the optimizer state keep working; FACTS: slicing
into nn.Sequential renames parameters and loading fails). When a rank holds two stages (interleaved and zero-bubble
schedules), each stage is a *view*: another instance of the model class registering the same child modules (no
copy), restricted to that stage's blocks, so the schedule can run the stages separately while the rank model still
owns every parameter once (for the optimizer, FSDP and state dicts).

Placement (stage -> pp rank):
    1f1b, gpipe:                   stage r on rank r
    interleaved_1f1b, zero_bubble: stages r and r + pp on rank r (loop)
(torch's V-shaped ScheduleZBVZeroBubble trains correctly here but its eval() fails in torch 2.13 — "can't
steal_bwd_input if this stage doesn't have backward" — so it is not offered.)

Loss and gradients. The last stage's loss function is the same `compute_loss` as one process, normalised by the
labelled tokens of the whole global batch, so the gradient of a step is the SUM over micro-batches and the schedule
must not rescale it (`scale_grads=False`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    _PipelineSchedule,
)

from framework.config import Recipe
from framework.parallel.dims import ParallelDims

FIRST_ONLY = ("tok_embeddings", "pos_embeddings", "type_embeddings", "embed_norm")
"""Input modules: only the first stage embeds tokens."""
LAST_ONLY = ("norm", "head_transform", "output", "output_bias", "mtp")
"""Output modules (and the tied head's bias): only the last stage produces logits. The multi-token prediction
depths (`mtp`) run after the main stack's final norm, on the last stage too."""

SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")
"""Schedules that put two stages on each pipeline rank."""


def stage_blocks(n_layers: int, stages: int, explicit: list[int] | None) -> list[list[int]]:
    """Block indices of each stage: `explicit` counts per stage, or an even split (ParallelDims checked both)."""
    counts = explicit or [n_layers // stages] * stages
    starts = [sum(counts[:i]) for i in range(stages)]
    return [list(range(start, start + count)) for start, count in zip(starts, counts, strict=True)]


def stages_of_rank(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `pp_rank` runs, in execution order (see the placement table above)."""
    if schedule not in MULTI_STAGE:
        return [pp_rank]
    return [pp_rank, pp_rank + pp]


@dataclass
class PipelineParts:
    """What `split_for_pipeline` leaves on this rank: the rank model (owns every parameter once) and one module per
    stage (the rank model itself when there is a single stage)."""

    stage_ids: list[int]
    num_stages: int
    modules: list[nn.Module]


def split_for_pipeline(model: nn.Module, dims: ParallelDims, recipe: Recipe, pp_rank: int) -> PipelineParts:
    """Delete from `model` (in place) what this pipeline rank does not run; return its stage modules."""
    p = recipe.parallel
    per_stage = stage_blocks(recipe.model.n_layers, dims.pp_stages, p.pp_layers)
    ids = stages_of_rank(pp_rank, dims.pp, p.pp_schedule)
    last = dims.pp_stages - 1
    owned = {b for s in ids for b in per_stage[s]}
    tied = shares_embedding(recipe)
    _prune(model, owned, _unowned(first=0 in ids, last=last in ids, tied=tied))
    if len(ids) == 1:
        return PipelineParts(ids, dims.pp_stages, [model])
    views = [_view(model, set(per_stage[s]), _unowned(first=s == 0, last=s == last, tied=tied)) for s in ids]
    return PipelineParts(ids, dims.pp_stages, views)


def shares_embedding(recipe: Recipe) -> bool:
    """Whether the last stage uses the token embedding too: a tied head, or multi-token prediction (its depths
    embed the tokens ahead)."""
    return recipe.model.tie_embeddings or recipe.model.mtp is not None


def _unowned(*, first: bool, last: bool, tied: bool) -> set[str]:
    """Top-level modules a stage drops. With a tied head (or model.mtp: `shares_embedding`) the last stage keeps
    its own copy of `tok_embeddings` (initialised from the same name, so equal): the first and the last stage then
    sum that weight's gradients before each update (PipelineTrainModule), so the two copies stay identical."""
    drop = (set() if first else set(FIRST_ONLY)) | (set() if last else set(LAST_ONLY))
    if tied and last:
        drop.discard("tok_embeddings")
    return drop


def _prune(model: nn.Module, blocks: set[int], drop: set[str]) -> None:
    for key in [k for k in model.layers if int(k) not in blocks]:
        del model.layers[key]
    for name in drop:
        if hasattr(model, name):
            delattr(model, name)


def _view(model: nn.Module, blocks: set[int], skip: set[str]) -> nn.Module:
    """Another instance of the model's class sharing `model`'s modules: the given blocks and every top-level
    module not in `skip`. Its forward is the model's own forward on fewer modules."""
    view = type(model).__new__(type(model))
    nn.Module.__init__(view)
    for key, value in vars(model).items():
        if not key.startswith("_") and key != "training":
            setattr(view, key, value)  # plain attributes: cfg, causal, n_layers, whole
    for name, child in model.named_children():
        if name == "layers":
            view.layers = nn.ModuleDict({k: b for k, b in child.items() if int(k) in blocks})
        elif name not in skip:
            view.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        if name not in skip:
            view.register_parameter(name, param)
    return view


def build_schedule(
    parts: PipelineParts,
    recipe: Recipe,
    dims: ParallelDims,
    pp_mesh: DeviceMesh,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    """One PipelineStage per stage module of this rank, driven by the recipe's schedule."""
    stages = [
        PipelineStage(module, stage_id, parts.num_stages, device, group=pp_mesh.get_group())
        for module, stage_id in zip(parts.modules, parts.stage_ids, strict=True)
    ]
    chunks = recipe.parallel.pp_microbatches or dims.pp_stages
    schedule = SCHEDULES[recipe.parallel.pp_schedule]
    # Our loss is already each micro-batch's share of the global mean: the schedule must not divide by chunks.
    stage_arg: Any = stages if recipe.parallel.pp_schedule in MULTI_STAGE else stages[0]
    return schedule(stage_arg, n_microbatches=chunks, loss_fn=loss_fn, scale_grads=False)


def pp_sum(value: torch.Tensor, pp_mesh: DeviceMesh) -> torch.Tensor:
    """Sum over pipeline ranks (each holds a different part of the model, or of a quantity like the loss)."""
    value = value.clone()
    if pp_mesh.size() > 1:
        dist.all_reduce(value, group=pp_mesh.get_group())
    return value


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Any:
    """The loss runs in fp32 outside autocast, as on one process (the schedule calls it inside the forward)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
