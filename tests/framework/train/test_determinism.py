"""train.deterministic: the run trains with torch's deterministic algorithms on (and cuBLAS's fixed workspace set),
two runs repeat bit for bit (CPU), and the process's own settings come back afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from framework.config import ModelConfig, Recipe
from framework.run import train
from framework.train.trainer import Trainer


def _recipe(run_dir: Path, data: Path) -> Recipe:
    sizes = dict(
        vocab_size=4096, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=128, dropout=0.1
    )
    recipe = Recipe(model=ModelConfig(**sizes))
    recipe.data.tokenizer, recipe.data.train, recipe.data.validation = (
        str(data / "tokenizer.model"),
        str(data),
        None,
    )
    recipe.data.seq_len, recipe.data.verify = 128, "size"
    recipe.train.steps, recipe.train.global_batch_size, recipe.train.micro_batch_size = 4, 4, 2
    recipe.train.device, recipe.train.eval_every, recipe.train.deterministic = "cpu", 0, True
    recipe.checkpoint.every = 0
    recipe.logging.run_dir = str(run_dir)
    recipe.logging.progress_bar = recipe.logging.tensorboard = False
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
