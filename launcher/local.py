"""`loom train --nproc N [--nnodes M --node-rank R --master ADDR:PORT]`: start N local workers with torchrun
(torch.distributed.run) and relay signals to them.

Before any worker starts, this launcher (node 0's, with several machines) checks the run directory, moves an old
run aside on --overwrite and holds the run directory's lock until the workers are done (framework/run_dir.py);
the workers are told so (LAUNCHED_ENV) and leave it alone.

A planned preemption is quiet: a worker started here exits 0 after its preemption checkpoint (rank 0 prints the
one line about it), and this launcher turns the run's status into EXIT_PREEMPTED from <run_dir>/preempted.json.
Were the workers to exit 75, torchrun would count them as failed: SIGTERM the slower ones and print its
ChildFailedError traceback ("launcher.cli FAILED ... exitcode 75") into the log at every preemption.

One machine: a private rendezvous on a free port (torchrun --standalone). Several machines without a scheduler: the
same command on every node with its own --node-rank; torchrun's static rendezvous meets at node 0's ADDR:PORT (its
agent hosts the store there), and ranks are node_rank * N + local rank.

torchrun's agent forwards SIGINT/SIGTERM to its workers itself but not SIGUSR1 (the "save a checkpoint now"
signal), which would kill the agent. On SIGTERM it raises, prints its own traceback and SIGKILLs workers that take
more than 30 s, i.e. any whose preemption save is slow. So the agent ignores both SIGUSR1 and SIGTERM (torchrun's
--signals-to-handle without SIGTERM; under Slurm every process of the step receives the signal, the
agent too), both go straight to the workers (the agent's children), which save and exit 0, and SIGINT (Ctrl-C)
goes to the agent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from launcher.exit_codes import EXIT_PREEMPTED

if TYPE_CHECKING:
    from framework.config.schema import Recipe

RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
TO_WORKERS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals relayed to the workers themselves (the preemption signals: save, then stop); the rest to the agent."""
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""What torchrun's agent handles itself (its --signals-to-handle, given as the PET_ environment variable torchrun
reads for it, which an older torchrun without the flag ignores; the default adds SIGTERM)."""


@dataclass(frozen=True)
class Nodes:
    """A static multi-node rendezvous: this machine is node `node_rank` of `nnodes`; node 0 listens at addr:port."""

    nnodes: int
    node_rank: int
    addr: str
    port: int


def torchrun_command(nproc: int, worker_args: Sequence[str], nodes: Nodes | None = None) -> list[str]:
    """torchrun starting `nproc` workers here, each running `loom <worker_args>`: one node with a private
    rendezvous, or node `nodes.node_rank` of a static rendezvous (a fixed node count, no elastic membership)."""
    if nodes is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [
            f"--nnodes={nodes.nnodes}",
            f"--node-rank={nodes.node_rank}",
            f"--master-addr={nodes.addr}",
            f"--master-port={nodes.port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        "-m",
        "launcher.cli",
        *worker_args,
    ]


def run_dir_guard(
    recipe: Recipe, resume: str | None, overwrite: bool, nodes: Nodes | None, accept_data_change: bool = False
) -> contextlib.AbstractContextManager:
    """The run-dir checks, --overwrite and lock for the whole run, taken here (not by a worker) so that the old run
    is moved aside once, before any worker writes; on node 0 alone with several machines (one shared run dir)."""
    from framework.run_dir import guard_run_dir  # here: `loom status` need not import torch

    if nodes is not None and nodes.node_rank != 0:
        return contextlib.nullcontext()
    return guard_run_dir(recipe, resume=resume, overwrite=overwrite, accept_data_change=accept_data_change)


def launch(
    nproc: int, worker_args: Sequence[str], nodes: Nodes | None = None, run_dir: str | Path | None = None
) -> int:
    """Run this node's workers to completion; their exit status (0 when all succeeded), or EXIT_PREEMPTED when
    they stopped on a signal after committing a checkpoint: rank 0 left <run_dir>/preempted.json, and the status is
    recovered from that record (the workers exit 0 then; any non-zero exit is 1 to torchrun)."""
    started = time.time()
    status = _run_agent(torchrun_command(nproc, worker_args, nodes))
    if run_dir is not None and _preempted_since(Path(run_dir), started):
        return EXIT_PREEMPTED
    return status


def _preempted_since(run_dir: Path, started: float) -> bool:
    from framework.train.callbacks.preemption import RECORD  # here: `loom status` need not import torch

    record = run_dir / RECORD
    return record.is_file() and record.stat().st_mtime >= started


def _run_agent(command: list[str]) -> int:
    # The agent ignores SIGUSR1 and SIGTERM (under Slurm, `scancel --signal=USR1` and a preemption's SIGTERM reach
    # every process of the step, the agent too); the workers reset them and install the Checkpointer's handler.
    from framework.run_dir import LAUNCHED_ENV

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        LAUNCHED_ENV: "1",
        "PET_SIGNALS_TO_HANDLE": AGENT_SIGNALS,
    }
    agent = subprocess.Popen(command, env=env, preexec_fn=_ignore_preemption_signals)

    def relay(signum: int, frame: FrameType | None) -> None:
        targets = _children(agent.pid) if signum in TO_WORKERS else [agent.pid]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):  # a worker that already exited
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, relay) for sig in RELAYED}
    try:
        return agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_preemption_signals() -> None:
    for sig in TO_WORKERS:
        signal.signal(sig, signal.SIG_IGN)


def restore_preemption_signals() -> None:
    """In a worker started by this launcher: the default action for the signals its agent ignores (an ignored
    disposition is inherited through fork and exec) until the Checkpointer installs its handler."""
    for sig in TO_WORKERS:
        signal.signal(sig, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    """The agent's worker processes (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []
