"""`loom train --nproc 2` with a two-stage pipeline (tied embeddings, validation through the schedule) logs the same
losses as one process training the same recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from framework.config.loader import load_recipe
from framework.run import train

ROOT = Path(__file__).resolve().parents[2]
SETS = {
    "train.steps": 3,
    "train.micro_batch_size": 8,
    "train.eval_every": 2,
    "train.eval_batches": 2,
    "train.device": "cpu",
    "logging.progress_bar": False,
    "logging.tensorboard": False,
    "checkpoint.save_final": False,
}


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        r["loss"] if r["kind"] == "train" else r["val_loss"] for r in records if r["kind"] in ("train", "val")
    ]


def test_pipeline_run_matches_one_process(demo_data: Path, tmp_path: Path, monkeypatch) -> None:
    pipeline = {**SETS, "parallel.pp": 2, "parallel.dp_shard": 1, "logging.run_dir": tmp_path / "pp"}
    sets = [a for k, v in pipeline.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", "--nproc", "2", *sets]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2 = pp 2" in done.stderr  # the log names the layout

    one = {**SETS, "logging.run_dir": tmp_path / "one"}
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the repository
    train(load_recipe(ROOT / "recipes/debug.yaml", [f"{k}={v}" for k, v in one.items()]))
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "pp")
    assert len(got) == len(expected) >= 4, (got, expected)  # 3 train steps + validation
    for a, b in zip(got, expected, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got, expected)
