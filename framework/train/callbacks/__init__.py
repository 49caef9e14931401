"""Callbacks of the training loop, and the default set a recipe asks for."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from framework.config import Recipe
from framework.train.callbacks.base import Callback
from framework.train.callbacks.checkpointer import Checkpointer
from framework.train.callbacks.metrics_logger import MetricsLogger
from framework.train.callbacks.profiler import Profiler, StepTrace
from framework.train.callbacks.recipe_record import RecipeRecord
from framework.train.callbacks.stability import Stability, TrainingHalted
from framework.train.callbacks.summary import RunSummary
from framework.train.callbacks.validation import Validation
from framework.train.callbacks.wandb_logger import WandbLogger


def default_callbacks(
    recipe: Recipe,
    *,
    val_batches: Iterable | None = None,
    flops_per_token: float | None = None,
    resume: str | Path | None = None,
    rank: int = 0,
    checkpoints: bool = True,
    layout: dict[str, int] | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    accept_data_change: bool = False,
) -> list[Callback]:
    """Logger first (it records a step before anything else may stop the run), then stability, validation,
    checkpoints (a checkpoint at step N then holds that step's validation in the logs), then the end-of-run
    summary (it reports the final checkpoint) and W&B (it reads its run id from a resumed checkpoint)."""
    callbacks: list[Callback] = [
        MetricsLogger(
            recipe.logging,
            total_steps=recipe.train.steps,
            flops_per_token=flops_per_token,
            rank=rank,
            # tp and pp peers count the same tokens: per-GPU rates divide them among those ranks
            devices_per_token=(layout or {}).get("tp", 1) * (layout or {}).get("pp", 1),
        ),
        Stability(recipe.train, recipe.logging.run_dir),
    ]
    if val_batches is not None:
        callbacks.append(Validation.from_recipe(val_batches, recipe.train, dp_rank=dp_rank, dp_size=dp_size))
    checkpointer = None
    if checkpoints:
        distributed = layout is not None and layout["world_size"] > 1
        checkpointer = Checkpointer(
            recipe,
            resume=resume,
            rank=rank,
            distributed=distributed,
            layout=layout,
            accept_data_change=accept_data_change,
        )
        callbacks.append(checkpointer)
    if recipe.logging.profile_step is not None:
        callbacks.append(
            StepTrace(Path(recipe.logging.run_dir) / "profile", recipe.logging.profile_step, rank)
        )
    callbacks.append(RunSummary(recipe, checkpointer=checkpointer, rank=rank))
    callbacks.append(WandbLogger(recipe, rank=rank))
    callbacks.append(RecipeRecord(recipe, rank))  # last: only a run whose start succeeded records its recipe
    return callbacks


__all__ = [
    "Callback",
    "Checkpointer",
    "MetricsLogger",
    "Profiler",
    "RecipeRecord",
    "RunSummary",
    "Stability",
    "TrainingHalted",
    "Validation",
    "WandbLogger",
    "default_callbacks",
]
