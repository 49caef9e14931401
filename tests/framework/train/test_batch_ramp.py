"""Batch-size ramp-up (train.batch_ramp): the step sizes follow the ramp's definition, the data order is the plain
run's (global sample positions), and a resume mid-ramp is exact: on one process through `train` (bitwise), and on
another data-parallel size for the data (the same global batches)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from train_helpers import demo_run_recipe

from framework.config import ConfigError, Recipe
from framework.config.schema import BatchRampConfig, TrainConfig
from framework.run import train

RAMP = BatchRampConfig(start=4, increment=4, over_tokens=40 * 128)  # 4 -> 16 sequences over 40 samples


def test_sizes_follow_the_definition() -> None:
    """Megatron's rule: (16 - 4) / 4 = 3 increases, one per 40/3 samples of the data position; then 16."""
    for position in range(0, 80):
        want = min(16, 4 + 4 * math.floor(position / (40 / 3)))
        assert RAMP.size_at(16, 128, position) == want, position


def test_bad_ramps_are_config_errors() -> None:
    for ramp, key in [
        (BatchRampConfig(start=16, increment=4), "train.batch_ramp.start"),
        (BatchRampConfig(start=5, increment=11), "train.batch_ramp.start"),
        (BatchRampConfig(start=6, increment=2), "train.batch_ramp.start"),  # micro-batch 4
    ]:
        with pytest.raises(ConfigError) as err:
            TrainConfig(global_batch_size=16, micro_batch_size=4, batch_ramp=ramp).validate()
        assert err.value.key == key, (ramp, err.value)


def _recipe(run_dir: Path, data: Path, steps: int) -> Recipe:
    recipe = demo_run_recipe(run_dir, data, steps=steps, global_batch=16, micro_batch=4, every=3)
    recipe.train.batch_ramp = RAMP
    return recipe


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_a_run_ramps_and_resumes_mid_ramp_bitwise(tmp_path: Path, demo_data: Path) -> None:
    train(_recipe(tmp_path / "full", demo_data, 7))
    rows = _train_rows(tmp_path / "full")
    sizes, position = [], 0
    for _ in range(7):
        sizes.append(RAMP.size_at(16, 128, position))
        position += sizes[-1]
    assert sizes == [4, 4, 4, 4, 8, 8, 12]  # mid-ramp at the step-3 checkpoint and beyond
    # metrics' tokens are cumulative: each step's own are the differences
    assert [r["tokens"] for r in rows] == [128 * sum(sizes[: i + 1]) for i in range(7)]

    resumed = _recipe(tmp_path / "resumed", demo_data, 7)
    train(resumed, resume=str(tmp_path / "full" / "checkpoints" / "step_00000003"))
    after = _train_rows(tmp_path / "resumed")
    assert [r["step"] for r in after] == [4, 5, 6, 7]
    assert [r["loss"] for r in after] == [r["loss"] for r in rows[3:]]  # bit for bit
    assert [r["tokens"] for r in after] == [r["tokens"] for r in rows[3:]]
