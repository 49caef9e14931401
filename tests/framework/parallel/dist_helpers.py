"""Run test functions on N gloo processes, reusing the processes (and their process group) across tests.

Starting a process and importing torch costs seconds on a 2-core machine, so a `DistPool` of N workers is started
once per test session (see the `dist_pool` fixture in conftest.py) and every test submits a function by import
path: `pool.run("tests.framework.parallel.dist_cases:ddp_parity", arg)` runs it on every rank with the default
gloo group initialised and returns the per-rank results (rank order). A child's exception is re-raised here with
its traceback; after one, the pool is restarted, because a failed collective can leave the group unusable.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TASK_TIMEOUT_S = 120.0
"""A task that takes longer is treated as a hang (a rank stuck in a collective): the pool is killed."""


THREAD_LIMIT = 250
"""Workers holding more threads than this are replaced after the task (see DistPool._threads)."""


class DistError(RuntimeError):
    """A function failed on at least one rank; the message holds each failing rank's traceback."""


def resolve(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # N processes share 2 cores: more threads only add contention
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=TASK_TIMEOUT_S)
    )
    while (task := tasks.get()) is not None:
        path, args, kwargs = task
        try:
            results.put((rank, True, resolve(path)(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - CheckpointException is a BaseException; report everything
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistPool:
    """`world_size` spawned processes in one gloo group, running submitted functions until `close()`."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, path: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run the function at `path` on every rank; its per-rank return values, in rank order."""
        for q in self._tasks:
            q.put((path, args, kwargs))
        replies = self._collect()
        failures = [f"--- rank {r} ---\n{tb}" for r, (ok, tb) in sorted(replies.items()) if not ok]
        if failures:
            self._restart()
            raise DistError(f"{path} failed on {len(failures)} rank(s):\n" + "\n".join(failures))
        if self._threads() > THREAD_LIMIT:
            self.close()  # a fresh set of workers; the next task pays a start-up
            self._start()
        return [replies[r][1] for r in range(self.world_size)]

    def _threads(self) -> int:
        """The most threads any worker holds (Linux /proc). Every process group a test creates (each mesh
        dimension, each async checkpoint writer) leaves gloo threads behind for the worker's lifetime: at ~700
        threads per worker, 14 idle workers drove the load average to 400 and slowed every later test."""
        counts = [len(os.listdir(f"/proc/{p.pid}/task")) for p in self._procs if p.is_alive()]
        return max(counts, default=0)

    def _collect(self) -> dict[int, tuple[bool, Any]]:
        replies: dict[int, tuple[bool, Any]] = {}
        while len(replies) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty as err:
                self._restart()
                missing = sorted(set(range(self.world_size)) - set(replies))
                raise DistError(f"no reply from ranks {missing} in {TASK_TIMEOUT_S:.0f} s") from err
            replies[rank] = (ok, value)
            if not ok:
                # The other ranks may be blocked in a collective with the failed one; don't wait for them.
                break
        return replies

    def _restart(self) -> None:
        self._kill()
        self._start()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join()

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
        self._kill()
