"""The training loop. It only moves batches and calls hooks; everything else is a callback."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from framework.config import Recipe
from framework.train.callbacks.base import Callback
from framework.train.train_module import BaseTrainModule, Batch


def split_micro_batches(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Cut a batch along dim 0 into micro-batches of `micro_batch_size` sequences (every tensor is [B, ...])."""
    pieces = {k: torch.split(v, micro_batch_size) for k, v in batch.items()}
    count = len(pieces["input_ids"])
    return [{k: v[i] for k, v in pieces.items()} for i in range(count)]


class Trainer:
    """Runs `train_module` for recipe.train.steps optimizer steps over `batches`.

    `batches` yields dicts (a whole per-rank global batch, or micro-batches: either way they are cut into
    train.micro_batch_size pieces and grouped into the step's accumulation count) or lists of micro-batch dicts,
    each list one step's, used as they are (its length may vary: train.batch_ramp). If it has state_dict()/load_state_dict(), its position is checkpointed.
    `dp_size` is the data-parallel world size (per-rank batch = global_batch_size / dp_size).
    """

    def __init__(
        self,
        train_module: BaseTrainModule,
        batches: Iterable[Batch | list[Batch]],
        callbacks: Sequence[Callback],
        recipe: Recipe,
        *,
        dp_size: int = 1,
    ) -> None:
        self.train_module = train_module
        self.batches = batches
        self.callbacks = list(callbacks)
        self.recipe = recipe
        cfg = recipe.train
        self.accumulation_steps = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
        self.should_stop = False
        """A callback sets this to end fit() cleanly after the current step."""
        self.rewind_request: str | None = None
        """Why the step just vetoed should be rewound (train.spike_policy rewind); the Checkpointer acts on it."""
        self.last_metrics: dict[str, Any] | None = None
        self._iterator: Iterator[Batch | list[Batch]] | None = None

    @property
    def step(self) -> int:
        return self.train_module.step

    def fit(self) -> dict[str, Any] | None:
        """Train to recipe.train.steps (or until the data ends or a callback sets should_stop); returns the last
        step's metrics. Calling it again continues from the current step."""
        self.should_stop = False
        if self.train_module.step == 0:
            # Dropout draws from torch's generators: seed them for a fresh run (a resume restores them instead).
            torch.manual_seed(self.train_module.rng_seed)  # per rank: see framework/parallel/rng.py
        try:
            self.emit("on_fit_start")
            self._train_steps()
            self.emit("on_fit_end")
        except BaseException as error:
            self.emit("on_exception", error)  # e.g. a preemption: the summary still reports the run
            raise
        finally:
            self.emit("on_close")
        return self.last_metrics

    def _train_steps(self) -> None:
        module = self.train_module
        if module.step and module.step >= self.recipe.train.steps:
            warnings.warn(
                f"already finished at step {module.step} (train.steps): nothing to train", stacklevel=3
            )
        while module.step < self.recipe.train.steps and not self.should_stop:
            start = time.perf_counter()
            micro_batches = self._next_micro_batches()
            if micro_batches is None:
                warnings.warn(f"training data ran out after {module.step} steps", stacklevel=2)
                return
            self.emit("on_step_start")
            module.train_batch(micro_batches)
            metrics = module.optim_step(veto=self._veto)
            # Wall time of data + forward/backward + update (optim_step synced); callbacks are not counted.
            metrics["step_time"] = time.perf_counter() - start
            self.last_metrics = metrics
            self.emit("on_step_end", metrics)

    def _veto(self, stats: dict[str, Any]) -> str | None:
        for callback in self.callbacks:
            reason = callback.on_before_optim_step(self, stats)
            if reason:
                return reason
        return None

    def emit(self, hook: str, *args: Any) -> None:
        """Call `hook` on every callback, in order."""
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _next_micro_batches(self) -> list[Batch] | None:
        if self._iterator is None:
            self._iterator = iter(self.batches)
        micro: list[Batch] = []
        while len(micro) < self.accumulation_steps:
            item = next(self._iterator, None)
            if item is None:
                return None
            if isinstance(item, list):
                if not micro:
                    return item  # one step's micro-batches (a batch-size ramp varies their count)
                micro.extend(item)
            else:
                micro.extend(split_micro_batches(item, self.recipe.train.micro_batch_size))
        if len(micro) != self.accumulation_steps:
            raise ValueError(
                f"got {len(micro)} micro-batches for one step, expected {self.accumulation_steps} "
                "(global_batch_size / (micro_batch_size x data-parallel size)); batches must tile it exactly"
            )
        return micro

    # -- state the Checkpointer saves besides the train module --------------------------------------------

    def data_state(self) -> Any:
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def data_position(self) -> int | None:
        """The global sample position the next step starts from (None for a stream without one)."""
        return getattr(self.batches, "consumed_samples", None)

    def skip_data(self, start: int, end: int) -> None:
        """Step over global samples [start, end) from the next step on."""
        self.batches.skip(start, end)  # type: ignore[attr-defined]
        self._iterator = None  # the loader's read-ahead predates the range

    def load_data_state(self, state: Any) -> None:
        if state is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state)
            self._iterator = None  # resume from the restored position

    def callback_states(self) -> dict[str, Any]:
        return {cb.name: state for cb in self.callbacks if (state := cb.state_dict())}

    def load_callback_states(self, states: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if callback.name in states:
                callback.load_state_dict(states[callback.name])
