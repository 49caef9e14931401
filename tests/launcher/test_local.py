"""`loom train --nproc 2`: two gloo workers under torchrun train the demo recipe and write one run directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Small and fast: 2 blocks, 3 steps; 3 held-out batches split unevenly over the 2 data-parallel ranks.
OVERRIDES = {
    "model.n_layers": 2,
    "train.steps": 3,
    "train.micro_batch_size": 8,
    "train.eval_batches": 3,
    "train.device": "cpu",
    "logging.tensorboard": False,
}


def _train_command(run_dir: Path, *launch: str, progress_bar: bool = False) -> list[str]:
    overrides = OVERRIDES | {"logging.run_dir": str(run_dir), "logging.progress_bar": progress_bar}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", *launch, *sets]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def nproc_2_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `loom train --nproc 2` run (layout dp_shard 2): its run directory and stderr."""
    run_dir = tmp_path_factory.mktemp("nproc2")
    cmd = _train_command(run_dir, "--nproc", "2")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stderr


def test_train_nproc_2_end_to_end(nproc_2_run: tuple[Path, str]) -> None:
    run_dir, stderr = nproc_2_run
    steps = _records(run_dir)
    assert [s["step"] for s in steps if s["kind"] == "train"] == [1, 2, 3]  # rank 0 alone logs
    assert [s["val_batches"] for s in steps if s["kind"] == "val"] == [3]  # all 3, split over the 2 ranks
    # One checkpoint for the run, committed once with both ranks' shards (never one per rank)
    step = run_dir / "checkpoints" / "step_00000003"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step.name
    assert sorted(p.name for p in step.glob("rank_*.json")) == ["rank_00000.json", "rank_00001.json"]
    assert (step / "COMPLETE").is_file()
    # every rank names the layout and its own coordinates
    for rank in (0, 1):
        assert (
            f"[rank {rank}] INFO framework.run: layout: world 2 = dp_shard 2 (fsdp); rank {rank}: dp_shard {rank}"
            in stderr
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_like_one_node_with_two_processes(
    nproc_2_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Two launchers on this machine act as two nodes (static rendezvous at node 0's address); the run equals
    the one-node --nproc 2 run of the same recipe (same data, same layout dp_shard 2)."""
    master = f"127.0.0.1:{_free_port()}"
    nodes = []
    for node_rank in (0, 1):
        launch = ["--nproc", "1", "--nnodes", "2", "--node-rank", str(node_rank), "--master", master]
        cmd = _train_command(tmp_path / f"node{node_rank}", *launch, progress_bar=True)
        nodes.append(
            subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    err0, err1 = (err for _, err in outputs)

    records = _records(tmp_path / "node0")
    assert not (tmp_path / "node1" / "metrics.jsonl").exists()  # rank 0 (on node 0) alone writes metrics
    reference = _records(nproc_2_run[0])
    final = [r for r in records if r["kind"] == "train"][-1]
    want = [r for r in reference if r["kind"] == "train"][-1]
    assert final["step"] == want["step"] == 3
    assert final["loss"] == want["loss"]  # the same computation, bit for bit
    assert [r["val_loss"] for r in records if r["kind"] == "val"] == [
        r["val_loss"] for r in reference if r["kind"] == "val"
    ]
    # rank 0 alone shows progress (plain lines: stderr is a pipe); each node's worker names the layout and its coordinates
    assert "train step 3/3 | loss" in err0 and "train step" not in err1  # pipes: plain lines, no bar
    assert "[rank 0] INFO framework.run: layout: world 2 = dp_shard 2 (fsdp); rank 0: dp_shard 0" in err0
    assert "[rank 1] INFO framework.run: layout: world 2 = dp_shard 2 (fsdp); rank 1: dp_shard 1" in err1


def test_bad_layout_is_one_line_before_launch(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "launcher.cli", "train", "recipes/debug.yaml", "--nproc", "3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("loom: error:") == 1 and "global_batch_size" in done.stderr


def _child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_planned_preemption_is_one_line_and_the_run_dir_is_locked_meanwhile(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], signum: signal.Signals
) -> None:
    """While `loom train --nproc 2` runs, its launcher holds the run dir: a second `loom train` there is refused
    with the launcher's host and pid. SIGUSR1 (Slurm's time-limit warning) or SIGTERM (a preemption) then stops
    the run as planned (checkpoint, exit 75), and its log holds one line for it: no torchrun ChildFailedError or
    SignalException traceback ("launcher.cli FAILED ... exitcode 75"). Under Slurm every process of the step gets
    the signal: here it is sent to the launcher and, as Slurm would, to torchrun's agent too."""
    from launcher.cli import main
    from launcher.exit_codes import EXIT_PREEMPTED

    run_dir = tmp_path / "run"
    cmd = [*_train_command(run_dir, "--nproc", "2"), "--set", "train.steps=200"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").is_file() and _records(run_dir)):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-3000:]
            time.sleep(0.1)
        second = _train_command(run_dir, "--resume", "auto")[3:]  # in this process: `loom train ...`
        assert main(second) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"host {socket.gethostname()}, pid {run.pid}" in err, err
        agent = _child_pids(run.pid)
        run.send_signal(signum)
        for pid in agent:
            os.kill(pid, signum)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr and "FAILED" not in stderr, stderr
    assert stderr.count(f"loom: preempted by {signum.name} after step") == 1, stderr
    assert json.loads((run_dir / "preempted.json").read_text())["signal"] == signum.name
