"""Loss-spike detection and the consecutive-skip limit.

A spike is a loss above mean + spike_sigma x std of the last spike_window *accepted* (applied) steps' losses; the
window must be full before anything fires. Skipped steps never enter the window, so one spike cannot raise the bar
for the next. Policy `skip` vetoes the update (the train module then leaves parameters and optimizer untouched);
`halt` writes a diagnostics JSON and raises TrainingHalted; `rewind` vetoes it too and asks the Checkpointer to go
back to the last good checkpoint and step over the data consumed since (framework/train/callbacks/checkpointer.py).
With train.spike_grad_norm the gradient norm has its own window and threshold. Independently, train.max_consecutive_skips skipped steps
in a row (non-finite values, spikes, fp16 overflows) also halt: the run is not recovering by itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.config import TrainConfig
from framework.train.callbacks.base import Callback

if TYPE_CHECKING:
    from framework.train.trainer import Trainer

_HISTORY_KEYS = ("step", "loss", "z_loss", "grad_norm", "lr", "skipped", "skip_reason", "loss_scale")


class TrainingHalted(RuntimeError):
    """Training stopped on purpose by a stability rule; the message names the diagnostics file."""


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Stability(Callback):
    def __init__(self, cfg: TrainConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.accepted: deque[float] = deque(maxlen=cfg.spike_window)
        self.norms: deque[float] = deque(maxlen=cfg.spike_window)
        """Gradient norms of the same accepted steps (train.spike_grad_norm)."""
        # Recent steps (accepted or not) for the diagnostics file.
        self.history: deque[dict[str, Any]] = deque(maxlen=max(cfg.spike_window, cfg.max_consecutive_skips))

    def spike_threshold(self, window: deque[float] | None = None) -> float | None:
        """mean + k x population std of an accepted window (the losses by default); None until the window is full
        or k = 0."""
        window = self.accepted if window is None else window
        if self.cfg.spike_sigma <= 0 or len(window) < self.cfg.spike_window:
            return None
        return statistics.fmean(window) + self.cfg.spike_sigma * statistics.pstdev(window)

    def _spike(self, stats: dict[str, Any]) -> str | None:
        """Why this step is a spike (its loss, or with train.spike_grad_norm its gradient norm), or None."""
        checks = [("loss", self.accepted)] + ([("grad_norm", self.norms)] if self.cfg.spike_grad_norm else [])
        for key, window in checks:
            threshold = self.spike_threshold(window)
            if threshold is not None and stats[key] > threshold:
                return (
                    f"{key} spike: {stats[key]:.6g} > {threshold:.6g} (mean + {self.cfg.spike_sigma} sigma)"
                )
        return None

    def on_before_optim_step(self, trainer: Trainer, stats: dict[str, Any]) -> str | None:
        reason = self._spike(stats)
        if reason is None:
            return None
        if self.cfg.spike_policy == "halt":
            self.halt(trainer, reason, current=stats)
        if self.cfg.spike_policy == "rewind":
            trainer.rewind_request = reason  # the Checkpointer rewinds at this step's end (no update applied)
        return "loss_spike"

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.history.append({k: metrics.get(k) for k in _HISTORY_KEYS})
        if not metrics["skipped"]:
            self.accepted.append(metrics["loss"])
            self.norms.append(metrics["grad_norm"])
        limit = self.cfg.max_consecutive_skips
        if metrics["consecutive_skips"] >= limit:
            reason = f"{metrics['consecutive_skips']} consecutive skipped steps (train.max_consecutive_skips={limit})"
            self.halt(trainer, reason, current=metrics)

    def halt(self, trainer: Trainer, reason: str, current: dict[str, Any]) -> None:
        """Write <run_dir>/halt_step_XXXXXXXX.json and raise TrainingHalted."""
        step = current.get("step", trainer.step)
        path = self.run_dir / f"halt_step_{step:08d}.json"
        report = {
            "step": step,
            "reason": reason,
            "spike_threshold": self.spike_threshold(),
            "current": {k: _json_value(current.get(k)) for k in _HISTORY_KEYS},
            "recent_steps": [{k: _json_value(v) for k, v in h.items()} for h in self.history],
            "accepted_losses": list(self.accepted),
            "train_config": dataclasses.asdict(self.cfg),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        raise TrainingHalted(f"training halted at step {step}: {reason}; diagnostics in {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"accepted": list(self.accepted), "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accepted.clear()
        self.accepted.extend(state.get("accepted", []))
        self.norms.clear()
        self.norms.extend(state.get("norms", []))
