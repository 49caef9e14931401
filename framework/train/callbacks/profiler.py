"""torch.profiler over a few steps, traces written for TensorBoard / Perfetto; StepTrace: one step of a run
(`logging.profile_step`), as a Chrome trace and a table of the ops with the most time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from framework.train.callbacks.base import Callback

if TYPE_CHECKING:
    from framework.train.trainer import Trainer


class Profiler(Callback):
    """Skips `wait` steps, warms up for `warmup`, records `active` steps once, into `out_dir`."""

    def __init__(self, out_dir: str | Path, *, wait: int = 1, warmup: int = 1, active: int = 3) -> None:
        self.out_dir = Path(out_dir)
        self.schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self._profile: torch.profiler.profile | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.train_module.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(
            activities=activities,
            schedule=self.schedule,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out_dir)),
        )
        self._profile.start()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self._profile is not None:
            self._profile.step()  # advances the wait/warmup/active schedule by one training step

    def on_close(self, trainer: Trainer) -> None:
        if self._profile is not None:
            self._profile.stop()
            self._profile = None


TOP_KERNELS = 15


class StepTrace(Callback):
    """Traces step `step` (1-based, as logged) on rank 0: the step before it warms the profiler up (its first
    events carry setup costs), then one active step. Writes <out_dir>/step_N.trace.json and
    step_N.top_kernels.json. A run resumed past `step` traces nothing."""

    def __init__(self, out_dir: str | Path, step: int, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.step = step
        self.enabled = rank == 0
        self._profile: torch.profiler.profile | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        done = trainer.train_module.step  # steps finished before this launch
        if not self.enabled or done > self.step - 2:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.train_module.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=self.step - 2 - done, warmup=1, active=1, repeat=1)
        self._profile = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write
        )
        self._profile.start()

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self._profile is not None:
            self._profile.step()

    def on_close(self, trainer: Trainer) -> None:
        if self._profile is not None:
            self._profile.stop()
            self._profile = None

    def _write(self, prof: torch.profiler.profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"step_{self.step}.trace.json"
        tmp = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace)  # atomic: a reader never sees half a trace
        top = self.out_dir / f"step_{self.step}.top_kernels.json"
        top.write_text(json.dumps(top_ops(prof), indent=1) + "\n")


def top_ops(prof: torch.profiler.profile, n: int = TOP_KERNELS) -> list[dict[str, Any]]:
    """The `n` ops with the most self device time (CUDA kernels), or self CPU time when no device ran;
    times in milliseconds over the traced step."""
    events = prof.key_averages()
    device = any(e.self_device_time_total > 0 for e in events)
    key = "self_device_time_total" if device else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [
        {"name": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count, "on": "device" if device else "cpu"}
        for e in ranked
    ]
