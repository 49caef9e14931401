"""train.deterministic: the run trains with torch's deterministic algorithms on (and cuBLAS's fixed workspace set),
two runs repeat bit for bit (CPU), and the process's own settings come back afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from train_helpers import demo_run_recipe

from framework.config import Recipe
from framework.run import train
from framework.train.trainer import Trainer


def _recipe(run_dir: Path, data: Path) -> Recipe:
    recipe = demo_run_recipe(run_dir, data, steps=4, global_batch=4, micro_batch=2, dropout=0.1)
    recipe.train.deterministic = True
    return recipe


def test_two_deterministic_runs_are_bitwise_equal(tmp_path: Path, demo_data: Path, monkeypatch) -> None:
    seen: list[tuple[bool, str | None]] = []
    fit = Trainer.fit

    def watched(self: Trainer) -> object:
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", watched)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    losses = []
    for name in ("a", "b"):
        train(_recipe(tmp_path / name, demo_data))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert seen == [(True, ":4096:8")] * 2
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
