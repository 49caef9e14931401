"""The callback interface: every side job of the training loop hooks in here, never inside the loop itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.train.trainer import Trainer


class Callback:
    """Override the hooks you need. Hooks run in the order the callbacks were given to the Trainer.

    Order of one fit(): on_fit_start; per step: on_step_start -> (train_module.train_batch) ->
    on_before_optim_step (between backward and the update; return a reason string to skip the update) ->
    on_step_end(metrics); on_validation(metrics) whenever a Validation callback has run; on_log(kind, record)
    whenever a metrics record is made (MetricsLogger's train and val records, RunSummary's summary: the lines of
    metrics.jsonl, which every sink writes from here); on_fit_end after the last step; on_exception(error) when fit
    raises (a preemption, a halt, a failure), before on_close; on_close always, also after an exception (release
    files and writers there).
    """

    @property
    def name(self) -> str:
        """Key of this callback's state in checkpoints."""
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer) -> None:
        pass

    def on_before_optim_step(self, trainer: Trainer, stats: dict[str, Any]) -> str | None:
        """`stats` holds step, loss, z_loss, grad_norm (finite) of the pending update. Return a reason to skip."""
        return None

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def on_log(self, trainer: Trainer, kind: str, record: dict[str, Any]) -> None:
        """`record` is one line of metrics.jsonl without its "kind" ('train', 'val' or 'summary'); do not edit it."""

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        """fit() is raising `error`; must not raise itself (it would hide `error`)."""

    def on_close(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (empty = nothing to save)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
