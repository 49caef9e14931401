"""Rank 0 alone logs: the progress bar, metrics.jsonl and TensorBoard stay off on every other rank (the two-node
launch test in tests/launcher/test_local.py shows the same from real worker processes)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from train_helpers import make_recipe

from framework.train.callbacks.metrics_logger import MetricsLogger

STEP = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens": 8, "step_time": 0.1}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_only_rank_zero_shows_the_bar_and_writes(rank: int, tmp_path) -> None:
    recipe = make_recipe(tmp_path, {"logging.progress_bar": True, "logging.tensorboard": True})
    stream = _Terminal()
    logger = MetricsLogger(recipe.logging, total_steps=1, rank=rank, stream=stream)
    module = SimpleNamespace(device=torch.device("cpu"), tokens=0, step=0)
    trainer = SimpleNamespace(
        train_module=module, emit=lambda hook, *args: getattr(logger, hook)(trainer, *args)
    )
    logger.on_fit_start(trainer)
    logger.on_step_end(trainer, STEP)
    logger.on_validation(trainer, {"step": 1, "val_loss": 1.5})
    logger.on_close(trainer)
    wrote = (
        (tmp_path / "metrics.jsonl").exists(),
        (tmp_path / "tb").exists(),
        "train: 100%" in stream.getvalue(),
    )
    assert wrote == ((True, True, True) if rank == 0 else (False, False, False))
