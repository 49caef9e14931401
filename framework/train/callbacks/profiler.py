"""torch.profiler over a few steps, traces written for TensorBoard / Perfetto."""

from __future__ import annotations

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
