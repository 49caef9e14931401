"""Held-out loss every train.eval_every steps and after the last step (once: a resumed finished run does not
repeat it)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
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

    With several data-parallel ranks (`dp_size`), every rank reads the same batches and the work is split: batch i
    is evaluated by dp rank i % dp_size (tensor/pipeline peers share a dp rank, so they run it together), and the
    (cross-entropy, tokens) sums are added over the dp ranks, so the loss is one process's over the same batches
    at 1/dp_size of the compute. When the count does not divide, the ranks without a batch in the last round run a
    stand-in forward whose result is dropped: sharded models (FSDP, TP, PP) need every peer in each forward.
    """

    def __init__(
        self, batches: Iterable[Batch], *, every: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
    ) -> None:
        self.batches = batches
        self.every = every
        self.num_batches = num_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._last_step: int | None = None

    @classmethod
    def from_recipe(
        cls, batches: Iterable[Batch], cfg: TrainConfig, *, dp_rank: int = 0, dp_size: int = 1
    ) -> Validation:
        return cls(
            batches, every=cfg.eval_every, num_batches=cfg.eval_batches, dp_rank=dp_rank, dp_size=dp_size
        )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        # The last step validates here, not at fit end: before the Checkpointer's save of that step (it comes
        # after this callback), so the checkpoint records it as validated and a resume does not repeat it.
        last = trainer.step >= trainer.recipe.train.steps
        if last or (self.every and trainer.step % self.every == 0):
            self.run(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._last_step != trainer.step:
            self.run(trainer)

    def state_dict(self) -> dict[str, Any]:
        # The step last validated travels with the checkpoint: resuming a finished run (or one saved right after
        # a validation) must not validate that step again and log a duplicate val line.
        return {} if self._last_step is None else {"last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_step = state.get("last_step")

    def run(self, trainer: Trainer) -> dict[str, Any] | None:
        module = trainer.train_module
        # fp64 sums: the total does not depend on how the batches were split (or their order) beyond fp64 rounding.
        sums = torch.zeros(3, dtype=torch.float64, device=module.device)  # cross-entropy, tokens, batches
        one = torch.ones((), dtype=torch.float64, device=module.device)
        for batch, mine in self._my_share():
            batch_loss, batch_tokens = module.eval_batch(batch)
            if mine:
                sums += torch.stack([batch_loss.double(), batch_tokens.double(), one])
        self._last_step = trainer.step
        # Every rank reaches this collective, also when the data is empty. One host sync per validation.
        total, count, seen = module.global_sum(sums).tolist()
        if seen == 0:
            warnings.warn("validation data is empty; no val_loss", stacklevel=2)
            return None
        val_loss = total / max(count, 1.0)
        metrics = {"step": trainer.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
                   "val_tokens": int(count), "val_batches": int(seen)}  # fmt: skip
        trainer.emit("on_validation", metrics)
        return metrics

    def _my_share(self) -> Iterator[tuple[Batch, bool]]:
        """(batch, whether its result counts): one forward per round of dp_size consecutive batches."""
        batches = itertools.islice(iter(self.batches), self.num_batches)
        while round_ := list(itertools.islice(batches, self.dp_size)):
            mine = self.dp_rank < len(round_)
            yield (round_[self.dp_rank] if mine else round_[0]), mine
