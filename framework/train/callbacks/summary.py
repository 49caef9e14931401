"""The end-of-run summary: what this launch of the run did and what to type next.

Rank 0 prints it to stdout when fit ends (finished, the data ran out, a callback stopped it) or is preempted, and
sends it through on_log as the {"kind": "summary"} record of metrics.jsonl (and W&B). A run that fails otherwise
gets no summary: its error says what happened.
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import statistics
import sys
import time
from array import array
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from framework.config import Recipe
from framework.train.callbacks.base import Callback
from framework.train.callbacks.preemption import Preempted
from framework.train.callbacks.progress import format_duration

if TYPE_CHECKING:
    from framework.train.callbacks.checkpointer import Checkpointer
    from framework.train.trainer import Trainer

log = logging.getLogger(__name__)

LAST_LOSSES = 10
"""The summary's train loss is the mean of the last this many logged train losses (nulls, i.e. non-finite
losses, left out): one step's loss is noisy."""


class RunSummary(Callback):
    """Collects this launch's train and val records (on_log) and reports them at the end.

    Throughput is the median over the logged intervals of this launch, without the first one when there are
    more (it holds the warm-up: compilation, allocator, caches); TFLOP/s and MFU likewise (null where
    MetricsLogger had no FLOP count or no peak). Wall time is since this launch's fit start. Place it after the
    Checkpointer, whose final save it reports (`checkpointer`: None when the run keeps no checkpoints).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        checkpointer: Checkpointer | None = None,
        rank: int = 0,
        stream: IO[str] | None = None,
    ) -> None:
        self.recipe = recipe
        self.checkpointer = checkpointer
        self.enabled = rank == 0
        self.stream = stream
        self._start = time.perf_counter()
        self._rates = {key: array("d") for key in ("tokens_per_s", "tflops", "mfu")}
        self._losses: deque[float] = deque(maxlen=LAST_LOSSES)
        self._val: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._start = time.perf_counter()
        for values in self._rates.values():
            del values[:]
        self._losses.clear()
        self._val = None

    def on_log(self, trainer: Trainer, kind: str, record: dict[str, Any]) -> None:
        if kind == "val":
            self._val = record
        if kind != "train":
            return
        for key, values in self._rates.items():
            values.append(math.nan if record.get(key) is None else record[key])
        if record.get("loss") is not None:
            self._losses.append(record["loss"])

    def on_fit_end(self, trainer: Trainer) -> None:
        step, total = trainer.step, self.recipe.train.steps
        if step >= total:
            self._report(trainer, "finished", f"finished: step {step} of {total}")
        elif trainer.should_stop:
            self._report(trainer, "stopped", f"stopped early by a callback after step {step} of {total}")
        else:
            self._report(
                trainer,
                "data_ended",
                f"stopped early: the training data ran out after step {step} of {total}",
            )

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        if not isinstance(error, Preempted):
            return  # a failure: its error says what happened
        detail = f"preempted by {signal.Signals(error.signum).name} after step {error.step} of {self.recipe.train.steps}"
        try:
            self._report(trainer, "preempted", detail)
        except Exception as failure:  # noqa: BLE001 - the preemption must still end the run as planned
            log.warning("no run summary: %s", failure)

    def _report(self, trainer: Trainer, status: str, detail: str) -> None:
        if not self.enabled:
            return
        record = self.record(trainer, status, detail)
        trainer.emit("on_log", "summary", record)
        print(format_summary(record), file=self.stream or sys.stdout, flush=True)

    def record(self, trainer: Trainer, status: str, detail: str) -> dict[str, Any]:
        """The summary as one flat JSON-able record (the keys of the `summary` line of metrics.jsonl)."""
        checkpoint = self.checkpointer.last_checkpoint if self.checkpointer is not None else None
        last = trainer.last_metrics or {}
        record: dict[str, Any] = {
            "step": trainer.step,
            "total_steps": self.recipe.train.steps,
            "status": status,
            "status_detail": detail,
            "tokens": trainer.train_module.tokens,
            "wall_time_s": time.perf_counter() - self._start,
            "logged_intervals": len(self._steady("tokens_per_s")),
            "first_interval_excluded": len(self._rates["tokens_per_s"]) > 1,
        }
        record.update({key: _median(self._steady(key)) for key in self._rates})
        record["train_loss"] = statistics.fmean(self._losses) if self._losses else None
        record["train_loss_count"] = len(self._losses)
        val = self._val or {}
        record.update(val_loss=val.get("val_loss"), val_ppl=val.get("val_ppl"), val_step=val.get("step"))
        record["skipped_steps"] = last.get("skipped_steps")
        record["checkpoint"] = None if checkpoint is None else str(checkpoint)
        record.update(next_commands(self.recipe, checkpoint))
        return record

    def _steady(self, key: str) -> list[float]:
        """The logged values of `key` past the first interval (all of them when there is only one)."""
        values = list(self._rates[key])
        kept = values[1:] if len(values) > 1 else values
        return [v for v in kept if not math.isnan(v)]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def next_commands(recipe: Recipe, checkpoint: Path | None) -> dict[str, str | None]:
    """The commands to type next: resume (with the run's resolved recipe, <run_dir>/recipe.yaml, which holds
    every --set of the run), export the checkpoint to Hugging Face, plot the run. No checkpoint: no resume
    or export."""
    run_dir = Path(recipe.logging.run_dir)
    written = run_dir / "recipe.yaml"  # RecipeRecord's copy; absent when a run was assembled without it
    recipe_path = shlex.quote(str(written)) if written.is_file() else "RECIPE"
    q = shlex.quote
    has = checkpoint is not None
    return {
        "resume_command": f"loom train {recipe_path} --resume auto" if has else None,
        "export_command": f"loom convert {q(str(checkpoint))} --to hf {q(str(run_dir / 'hf'))}"
        if has
        else None,
        "plot_command": f"loom plot {q(str(run_dir))} --out {q(str(run_dir / 'loss.png'))}",
    }


def format_summary(record: dict[str, Any]) -> str:
    """The short block printed at the end of a run."""
    lines = [f"loom: run summary ({record['status_detail']})"]
    rows = [
        (
            "tokens",
            f"{record['tokens']:,} in {format_duration(record['wall_time_s'])} (wall time of this launch)",
        ),
        ("speed", _speed(record)),
        ("train loss", _train_loss(record)),
        ("val loss", _val_loss(record)),
        ("skipped", "-" if record["skipped_steps"] is None else f"{record['skipped_steps']} steps"),
        ("checkpoint", record["checkpoint"] or "none (checkpoint.every: 0 and save_final: false?)"),
    ]
    lines += [f"  {name:<13}{text}" for name, text in rows]
    commands = [("resume", "resume_command"), ("export (HF)", "export_command"), ("plot", "plot_command")]
    lines.append("  next:")
    lines += [f"    {name:<13}{record[key]}" for name, key in commands if record[key]]
    if record["status"] == "finished" and record["resume_command"]:
        lines.append(
            "    (finished: a resume trains on only with a larger train.steps, e.g. --set train.steps=N)"
        )
    return "\n".join(lines)


def _speed(record: dict[str, Any]) -> str:
    if record["tokens_per_s"] is None:
        return "- (no step timed)"
    parts = [f"{record['tokens_per_s']:,.0f} tokens/s"]
    if record["tflops"] is not None:
        parts.append(f"{record['tflops']:.3g} TFLOP/s")
    if record["mfu"] is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    count = record["logged_intervals"]
    after = ", after the first" if record["first_interval_excluded"] else ""
    return ", ".join(parts) + f" (median of {count} logged interval{'s' if count != 1 else ''}{after})"


def _train_loss(record: dict[str, Any]) -> str:
    if record["train_loss"] is None:
        return "- (no finite loss logged)"
    return f"{record['train_loss']:.4f} (mean of the last {record['train_loss_count']} logged)"


def _val_loss(record: dict[str, Any]) -> str:
    if record["val_step"] is None:
        return "- (no validation in this launch)"
    if record["val_loss"] is None:
        return f"not finite (step {record['val_step']})"
    ppl = "-" if record["val_ppl"] is None else f"{record['val_ppl']:.4g}"
    return f"{record['val_loss']:.4f} (perplexity {ppl}, step {record['val_step']})"
