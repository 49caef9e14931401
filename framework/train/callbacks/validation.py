"""Held-out loss every train.eval_every steps and after the last step."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from framework.config import TrainConfig
from framework.train.callbacks.base import Callback
from framework.train.train_module import Batch

if TYPE_CHECKING:
    from framework.train.trainer import Trainer


class Validation(Callback):
    """Mean cross-entropy over the labelled tokens of the first `num_batches` batches of `batches`.

    `batches` must be re-iterable: every validation calls iter() on it and expects the same batches from the start
    (a list, or a data source whose __iter__ restarts). The result goes to every callback's on_validation.
    """

    def __init__(self, batches: Iterable[Batch], *, every: int, num_batches: int) -> None:
        self.batches = batches
        self.every = every
        self.num_batches = num_batches
        self._last_step: int | None = None

    @classmethod
    def from_recipe(cls, batches: Iterable[Batch], cfg: TrainConfig) -> Validation:
        return cls(batches, every=cfg.eval_every, num_batches=cfg.eval_batches)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            self.run(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._last_step != trainer.step:
            self.run(trainer)

    def run(self, trainer: Trainer) -> dict[str, Any] | None:
        module = trainer.train_module
        loss_sum = torch.zeros((), device=module.device)
        tokens = torch.zeros((), device=module.device)
        seen = 0
        for batch in itertools.islice(iter(self.batches), self.num_batches):
            batch_loss, batch_tokens = module.eval_batch(batch)
            loss_sum, tokens, seen = loss_sum + batch_loss, tokens + batch_tokens, seen + 1
        self._last_step = trainer.step
        if seen == 0:
            warnings.warn("validation data is empty; no val_loss", stacklevel=2)
            return None
        total, count = torch.stack(
            [loss_sum.float(), tokens.float()]
        ).tolist()  # one host sync per validation
        val_loss = total / max(count, 1.0)
        metrics = {"step": trainer.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
                   "val_tokens": int(count), "val_batches": seen}  # fmt: skip
        trainer.emit("on_validation", metrics)
        return metrics
