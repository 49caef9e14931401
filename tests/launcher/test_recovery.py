"""Crash and preemption drills with real processes (`loom train --nproc 2`, gloo): a rank killed with SIGKILL
mid-training, or while a checkpoint is being written, and `--resume auto` continues from the last complete
checkpoint with the losses of an uninterrupted run; SIGUSR1 to the launcher saves and exits 75.

Each drill picks its kill step at random (seeded, printed). CI runs LOOM_KILL_TRIALS trials per drill (default 1);
`LOOM_KILL_TRIALS=10 pytest tests/launcher/test_recovery.py` is the full drill recorded in docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.checkpoint import complete_checkpoints, latest_checkpoint
from framework.checkpoint.writer import SAVE_DELAY_ENV
from launcher.exit_codes import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("LOOM_KILL_TRIALS", "1"))
STEPS = 10


def _sets(run_dir: Path, data: Path) -> list[str]:
    values = {
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.kv_heads": 2,
        "model.ffn_hidden": 64,
        "data.tokenizer": data / "tokenizer.model",
        "data.train": data,
        "data.validation": "null",
        "data.verify": "size",
        "train.steps": STEPS,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.eval_every": 0,
        "train.device": "cpu",
        "checkpoint.every": 2,
        "checkpoint.keep_last": 2,
        "parallel.dp_shard": 2,
        "parallel.data_parallel": "fsdp",
        "logging.run_dir": run_dir,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _start(run_dir: Path, data: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", "--nproc", "2"]
    return subprocess.Popen(
        [*cmd, *_sets(run_dir, data), *extra],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(run_dir.parent / f"{run_dir.name}.log", "w"),  # noqa: SIM115 - closed with the process
    )


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"condition not reached (exit status {process.poll()})")
        time.sleep(0.05)


def _workers(launcher: subprocess.Popen) -> list[int]:
    """The torchrun agent's children: the worker processes."""
    agents = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(p) for a in agents for p in Path(f"/proc/{a}/task/{a}/children").read_text().split()]


def _finish(run_dir: Path, data: Path) -> None:
    done = _start(run_dir, data, "--resume", "auto")
    assert done.wait(timeout=300) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(demo_data: Path, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_dir.parent.mkdir(exist_ok=True)
    assert _start(run_dir, demo_data).wait(timeout=300) == 0
    return _losses(run_dir)


def _check_continues(run_dir: Path, killed_at: dict[int, float], reference: dict[int, float]) -> None:
    """After the resume every step 1..STEPS was logged, and each loss equals the uninterrupted run's."""
    losses = _losses(run_dir)  # the resumed run appends; later records of a step replace earlier ones
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference, (killed_at, losses, reference)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_one_rank_mid_training_then_resume_auto(demo_data, tmp_path, reference, trial) -> None:
    kill_at = random.Random(trial).randint(2, STEPS - 2)
    run_dir = tmp_path / "run"
    run = _start(run_dir, demo_data)
    _wait_for(lambda: max(_losses(run_dir), default=0) >= kill_at, run)
    os.kill(random.Random(trial).choice(_workers(run)), signal.SIGKILL)
    assert run.wait(timeout=120) != 0
    before = [s for s, _ in complete_checkpoints(run_dir / "checkpoints")]
    _finish(run_dir, demo_data)
    _check_continues(run_dir, {"kill_at": kill_at, "checkpoints": before}, reference)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_during_a_save_keeps_the_previous_checkpoint(demo_data, tmp_path, reference, trial) -> None:
    """Saves are slowed down (an injected 3 s delay in every rank's writer) and a rank is killed while its temp
    directory exists: the previous checkpoint is still `latest` and the resumed run is exact."""
    # a save with a committed one before it; every save before it also sleeps 3 s, and CI's one trial (0) draws
    # the list's second entry: the earliest such save, 4
    save_at = random.Random(trial).choice([6, 4, 8])
    run_dir = tmp_path / "run"
    run = _start(run_dir, demo_data, env={SAVE_DELAY_ENV: "3"})
    in_flight = run_dir / "checkpoints" / f".tmp-step_{save_at:08d}"
    _wait_for(in_flight.exists, run)
    os.kill(random.Random(trial).choice(_workers(run)), signal.SIGKILL)
    assert run.wait(timeout=120) != 0
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{save_at - 2:08d}"
    _finish(run_dir, demo_data)
    _check_continues(run_dir, {"killed_during_save_of": save_at}, reference)


def test_sigusr1_saves_and_exits_75(demo_data, tmp_path, reference) -> None:
    """The launcher forwards SIGUSR1 to the workers; they finish the step, save, and `loom train` exits 75
    (launcher/exit_codes.py); --resume auto then completes exactly."""
    run_dir = tmp_path / "run"
    run = _start(run_dir, demo_data)
    _wait_for(lambda: max(_losses(run_dir), default=0) >= 3, run)
    run.send_signal(signal.SIGUSR1)
    assert run.wait(timeout=120) == EXIT_PREEMPTED
    record = json.loads((run_dir / "preempted.json").read_text())
    assert record["signal"] == "SIGUSR1" and latest_checkpoint(run_dir / "checkpoints").name == (
        f"step_{record['step']:08d}"
    )
    assert record["step"] < STEPS
    _finish(run_dir, demo_data)
    _check_continues(run_dir, {"preempted_at": record["step"]}, reference)
