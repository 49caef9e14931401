"""`loom train --nproc 2`: two gloo workers under torchrun train the demo recipe and write one run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_train_nproc_2_end_to_end(demo_data: Path, tmp_path: Path) -> None:
    overrides = {
        "train.steps": 3,
        "train.micro_batch_size": 8,
        "train.device": "cpu",
        "logging.run_dir": str(tmp_path),
        "logging.progress_bar": False,
        "logging.tensorboard": False,
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", "--nproc", "2", *sets]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]  # rank 0 alone logs
    # Until sharded checkpoints exist a multi-process run writes none (never a racing, partial one) and says so.
    assert not (tmp_path / "checkpoints").exists()
    assert "no checkpoints are written" in done.stderr


def test_resume_with_several_processes_is_refused(tmp_path: Path) -> None:
    from framework.config.errors import ConfigError
    from framework.run import _refuse_distributed_resume

    _refuse_distributed_resume(None)
    with pytest.raises(ConfigError, match="sharded checkpoints"):
        _refuse_distributed_resume("auto")


def test_bad_layout_is_one_line_before_launch(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", "--nproc", "3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("loom: error:") == 1 and "global_batch_size" in done.stderr
