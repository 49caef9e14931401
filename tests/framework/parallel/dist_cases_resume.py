"""Whole training runs (framework.run, real data, real checkpoints) on every rank of a pool, for the resume tests."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from framework.checkpoint.writer import SAVE_DELAY_ENV
from framework.config import ModelConfig, ParallelConfig, Recipe
from framework.config.schema import BatchRampConfig, MoEConfig
from framework.parallel.dims import ParallelDims
from framework.run import train, train_distributed

SEQ = 128  # the demo corpus is packed at 128 tokens


def resume_recipe(
    run_dir: Path,
    data: Path,
    *,
    steps: int = 6,
    every: int = 3,
    moe: bool = False,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    batch_ramp: BatchRampConfig | None = None,
    **parallel: Any,
) -> Recipe:
    """A 2-block decoder on the demo corpus: cosine schedule with warmup (its state matters on resume), clipping
    active, fp32, no dropout (so a resume on another layout can match: its RNG streams differ)."""
    sizes = dict(vocab_size=4096, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=SEQ)
    cfg = ModelConfig(**sizes | (model or {}))
    if moe:
        cfg.moe = MoEConfig(n_experts=4, top_k=2)
    recipe = Recipe(model=cfg, parallel=ParallelConfig(**parallel))
    recipe.data.tokenizer, recipe.data.train, recipe.data.validation = (
        str(data / "tokenizer.model"),
        str(data),
        None,
    )
    recipe.data.seq_len, recipe.data.verify = SEQ, "size"  # sha256 of the shards on every rank: seconds each
    recipe.train.steps, recipe.train.global_batch_size, recipe.train.micro_batch_size = steps, 8, 2
    recipe.train.device, recipe.train.eval_every = "cpu", 0
    recipe.optim.lr, recipe.optim.grad_clip = 1e-3, 0.5
    for key, value in (optim or {}).items():
        setattr(recipe.optim, key, value)
    recipe.train.batch_ramp = batch_ramp
    recipe.schedule.name, recipe.schedule.warmup_steps = "cosine", 2
    recipe.checkpoint.every, recipe.checkpoint.keep_last = every, 10
    recipe.logging.run_dir = str(run_dir)
    recipe.logging.progress_bar = recipe.logging.tensorboard = False
    return recipe


def run_here(recipe: Recipe, resume: str | None = None, delay: float = 0.0) -> int:
    """Train `recipe` on this rank of the pool's group (laid out by its parallel section)."""
    os.environ[SAVE_DELAY_ENV] = str(delay)
    # Pool workers are daemon processes (they die with pytest), and multiprocessing refuses children to daemons;
    # the data loader's worker processes are joined by the loader itself, so lift the flag for this run.
    multiprocessing.current_process()._config["daemon"] = False  # noqa: SLF001 - test-only
    try:
        dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
        train_distributed(recipe, dims, torch.device("cpu"), resume=resume)
    finally:
        os.environ.pop(SAVE_DELAY_ENV, None)
    return dist.get_rank()


def run_single(recipe: Recipe, resume: str | None = None, delay: float = 0.0) -> None:
    """The same in this (non-distributed) process."""
    os.environ[SAVE_DELAY_ENV] = str(delay)
    try:
        train(recipe, resume=resume)
    finally:
        os.environ.pop(SAVE_DELAY_ENV, None)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl (rank 0 writes it)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def save_initial(recipe: Recipe, root: str) -> int:
    """Build the recipe's model laid out over the pool and commit its (initial) state as checkpoint step 0, the
    way a run does: every rank its own shards (DTensors, pipeline stages) under the one-process names."""
    from framework.checkpoint.writer import CheckpointWriter
    from framework.config.loader import recipe_to_dict
    from framework.engines.build import train_module_for
    from framework.parallel.dims import build_mesh
    from framework.run import build_parallel_model, layout_of

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    module = train_module_for(
        build_parallel_model(recipe, dims, mesh, torch.device("cpu")), recipe, "cpu", dims, mesh
    )
    layout = layout_of(dims, dims.world_size)
    writer = CheckpointWriter(root, rank=dist.get_rank(), distributed=True)
    from framework.checkpoint import get_rng_state

    rank_state = {
        "rng": get_rng_state(torch.device("cpu"))
    }  # as the Checkpointer writes it (verified on read)
    writer.save(0, module.state_dict(), {"recipe": recipe_to_dict(recipe), "layout": layout}, rank_state)
    return dist.get_rank()


def run_poisoned(recipe: Recipe, poison: tuple[int, int], token: int) -> list[int]:
    """run_here with the global samples [poison) read as one repeated `token` (a bad range of the data); returns
    the poisoned global indices this rank read."""
    from framework.data.source import TrainSource

    read: list[int] = []
    original = TrainSource.micro_batch

    def micro_batch(self: TrainSource, global_indices: Any) -> dict[str, torch.Tensor]:
        batch = original(self, global_indices)
        for row, g in enumerate(global_indices):
            if poison[0] <= g < poison[1]:
                read.append(int(g))
                batch["input_ids"][row] = token
                batch["labels"][row] = token
        return batch

    TrainSource.micro_batch = micro_batch  # type: ignore[method-assign]
    try:
        run_here(recipe)
    finally:
        TrainSource.micro_batch = original  # type: ignore[method-assign]
    return read
