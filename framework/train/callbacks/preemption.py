"""Preemption: SIGTERM or SIGUSR1 asks the run to finish its step, save, and stop with a documented status.

Slurm sends SIGUSR1 ahead of a time limit when the job asks for it (`--signal=USR1@120`) and SIGTERM when it
preempts or cancels a job; the Loom launcher sends both to the workers itself, and torchrun's agent ignores them
(launcher/local.py). A handler only records the
request; the Checkpointer acts on it at the next step boundary. In a multi-process run the ranks agree first (a
one-element all-reduce per step, read a step later so that no step waits for the device: `agreed`): signals reach
the ranks at slightly different times, and every rank must stop after the same step and write the same checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RECORD = "preempted.json"
"""Written into the run directory by rank 0 after the preemption checkpoint is committed; the launcher turns a
run that left it into exit status 75 (launcher/exit_codes.py)."""


class Preempted(Exception):
    """The run stopped early on a signal, after committing a checkpoint of `step` at `path`."""

    def __init__(self, step: int, path: Path | None, signum: int) -> None:
        super().__init__(f"preempted by {signal.Signals(signum).name} after step {step}; checkpoint: {path}")
        self.step, self.path, self.signum = step, path, signum


class PreemptionSignal:
    """Installs handlers for SIGTERM/SIGUSR1 (main thread only) and remembers the first signal received."""

    def __init__(self, distributed: bool = False, device: torch.device | None = None) -> None:
        self.distributed = distributed
        self.device = device or torch.device("cpu")
        self.received: int = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._pending: tuple[torch.Tensor, Any] | None = None  # the last posted reduction (see agreed)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a trainer elsewhere cannot be preempted
        if self._previous:
            return  # installed already (fit() called again): keep the original handlers to restore
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A process forked while training (a data-loader or pool worker) inherits this handler; there the
            # signal must keep its usual meaning, or terminating that worker would hang its parent.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or signum

    def agreed(self) -> int:
        """The signal number if any rank received one, else 0; collective when distributed (every rank calls it
        once per step). Distributed, the ranks' flags are max-reduced without waiting for the device: this call
        posts the reduction of the flag as of now and returns the result posted by the previous call, so a signal
        stops the ranks one step later than one process, after the same step on every rank."""
        if not self.distributed:
            return self.received
        seen = self._collect()
        flag = torch.tensor(
            [self.received], dtype=torch.int64, device=self.device
        )  # NCCL needs device tensors
        dist.all_reduce(
            flag, op=dist.ReduceOp.MAX, async_op=True
        ).wait()  # CUDA: the stream waits, not the host
        if flag.device.type == "cuda":
            host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        else:
            self._pending = (flag, None)
        return seen

    def _collect(self) -> int:
        """The previous call's reduced flag: on CUDA its copy to the host finished a step ago, so waiting on its
        event does not drain the queue."""
        if self._pending is None:
            return 0
        host, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        return int(host[0])


def write_record(run_dir: str | Path, step: int, path: Path | None, signum: int) -> None:
    record = {"step": step, "checkpoint": str(path) if path else None, "signal": signal.Signals(signum).name}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / RECORD).write_text(json.dumps(record) + "\n")


_RECORD_KEYS = {"step", "checkpoint", "signal"}


def clear_record(run_dir: str | Path) -> None:
    """Delete the preemption record of an earlier launch, recognised by its content (what `write_record`
    writes): a user's own file of that name is left alone."""
    path = Path(run_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and set(record) == _RECORD_KEYS:
        path.unlink(missing_ok=True)
