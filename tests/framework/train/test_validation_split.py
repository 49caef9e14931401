"""Validation split over data-parallel ranks, simulated in one process: each simulated rank's partial
(cross-entropy, tokens, batches) sums add up to the naive totals over the same batches, every batch is counted by
exactly one rank, and each rank runs ceil(n / dp) forwards (a dropped stand-in when the count does not divide).
The real collective (sums over a gloo dp group, FSDP/TP peers) is tested in
tests/framework/parallel/test_sharded_validation.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from framework.train import Validation

SEQ = 6


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Batch i: labels with i + 1 labelled tokens, each of cross-entropy i (the fake module's loss)."""
    out = []
    for i in range(n):
        labels = torch.full((1, SEQ + 4), -100)
        labels[0, : i + 1] = i
        out.append({"input_ids": torch.zeros(1, SEQ + 4, dtype=torch.long), "labels": labels})
    return out


class _Module:
    """eval_batch: (cross-entropy sum = batch index x labelled tokens, labelled tokens); global_sum records this
    rank's partial sums and returns them (the test adds the ranks up)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.evaluated: list[int] = []
        self.partial: list[float] | None = None

    def eval_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        tokens = (labels != -100).sum()
        index = int(labels[0, 0])
        self.evaluated.append(index)
        return torch.tensor(float(index)) * tokens, tokens

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        self.partial = value.tolist()
        return value


class _Trainer:
    def __init__(self, module: _Module) -> None:
        self.train_module, self.step = module, 3
        self.emitted: list[dict[str, Any]] = []

    def emit(self, hook: str, metrics: dict[str, Any]) -> None:
        self.emitted.append(metrics)


# A simulated rank sees only its own partial sums, so one that owns no batch warns "empty"; the real sum does not.
@pytest.mark.filterwarnings("ignore:validation data is empty")
@pytest.mark.parametrize(
    ("available", "num_batches", "dp"), [(5, 5, 2), (7, 5, 3), (1, 4, 3), (4, 10, 2), (6, 6, 1)]
)
def test_ranks_share_the_batches_once_and_sum_to_the_naive_total(
    available: int, num_batches: int, dp: int
) -> None:
    batches = _batches(available)
    used = min(available, num_batches)
    partials, counted = [], []
    for rank in range(dp):
        module = _Module()
        Validation(batches, every=0, num_batches=num_batches, dp_rank=rank, dp_size=dp).run(_Trainer(module))
        assert len(module.evaluated) == math.ceil(used / dp)  # the same forward count on every rank
        partials.append(module.partial)
        counted += [i for i in range(used) if i % dp == rank]  # what this rank owns
        assert set(module.evaluated) >= {i for i in range(used) if i % dp == rank}
    assert sorted(counted) == list(range(used))
    ce, tokens, seen = (sum(p[k] for p in partials) for k in range(3))
    naive_ce = sum(i * (i + 1) for i in range(used))
    naive_tokens = sum(i + 1 for i in range(used))
    assert (ce, tokens, seen) == (naive_ce, naive_tokens, used)


def test_one_rank_reports_the_naive_mean() -> None:
    module, trainer = _Module(), _Trainer(_Module())
    trainer.train_module = module
    metrics = Validation(_batches(4), every=0, num_batches=3).run(trainer)
    assert metrics is not None and trainer.emitted == [metrics]
    assert metrics["val_loss"] == (0 * 1 + 1 * 2 + 2 * 3) / (1 + 2 + 3)
    assert metrics["val_tokens"] == 6 and metrics["val_batches"] == 3 and metrics["step"] == 3


def test_empty_validation_still_reaches_the_sum_and_warns() -> None:
    module = _Module()
    with pytest.warns(UserWarning, match="empty"):
        assert Validation([], every=0, num_batches=2, dp_rank=1, dp_size=2).run(_Trainer(module)) is None
    assert module.partial == [0.0, 0.0, 0.0] and module.evaluated == []
