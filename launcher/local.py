"""`loom train --nproc N`: start N local workers with torchrun (torch.distributed.run) and relay signals to them.

torchrun's agent forwards SIGINT/SIGTERM to its workers itself but not SIGUSR1 (the "save a checkpoint now"
signal), which would kill the agent; so SIGUSR1 goes straight to the workers (the agent's children) and the other
signals to the agent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def torchrun_command(nproc: int, worker_args: Sequence[str]) -> list[str]:
    """One node, a private rendezvous on a free port; each worker runs `loom <worker_args>`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "launcher.cli",
        *worker_args,
    ]


def launch(nproc: int, worker_args: Sequence[str]) -> int:
    """Run the workers to completion; their exit status (0 when all succeeded)."""
    agent = subprocess.Popen(torchrun_command(nproc, worker_args), env={**os.environ, "OMP_NUM_THREADS": "1"})

    def relay(signum: int, frame: FrameType | None) -> None:
        targets = _children(agent.pid) if signum == signal.SIGUSR1 else [agent.pid]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):  # a worker that already exited
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, relay) for sig in RELAYED}
    try:
        return agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _children(pid: int) -> list[int]:
    """The agent's worker processes (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []
