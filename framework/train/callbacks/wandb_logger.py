"""Weights & Biases (`logging.wandb`): rank 0 logs the records of metrics.jsonl to one W&B run.

Train and val records become history rows at their step, named as in TensorBoard (train/loss, val/loss, ...); the
summary record goes to the run's summary under summary/...; the config is the resolved recipe. The `wandb`
package is imported only when W&B is on (`pip install loom-pretrain[wandb]`). The run's W&B id is kept in the
checkpoints, so a resumed run (e.g. a requeued Slurm job) continues the same W&B run. At the end the run is
finished (failed runs with exit code 1, preempted ones marked as preempting) and W&B's service process stopped.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.config import ConfigError, Recipe, WandbConfig
from framework.config.loader import recipe_to_dict
from framework.train.callbacks.base import Callback
from framework.train.callbacks.metrics_logger import scalars
from framework.train.callbacks.preemption import Preempted

if TYPE_CHECKING:
    from framework.train.trainer import Trainer

log = logging.getLogger(__name__)
INSTALL_FIX = "pip install loom-pretrain[wandb] (or: pip install wandb), or set logging.wandb.mode: disabled"


def check_wandb(cfg: WandbConfig) -> None:
    """W&B is on but the `wandb` package is missing: one ConfigError (without importing it: the import is slow)."""
    if cfg.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            None,
            "logging.wandb.mode",
            cfg.mode,
            "needs the wandb package, which is not installed",
            INSTALL_FIX,
        )


class WandbLogger(Callback):
    """Place it after the Checkpointer: its on_fit_start then knows the W&B id a resumed checkpoint holds."""

    def __init__(self, recipe: Recipe, *, rank: int = 0) -> None:
        self.recipe = recipe
        self.cfg = recipe.logging.wandb
        check_wandb(self.cfg)  # on every rank: all of them stop alike
        self.enabled = rank == 0 and self.cfg.mode != "disabled"
        self._run: Any = None
        self._run_id: str | None = None
        self._exit_code = 0
        self._excepthook = sys.excepthook

    def on_fit_start(self, trainer: Trainer) -> None:
        if not self.enabled or self._run is not None:
            return
        import wandb

        run_dir = Path(self.recipe.logging.run_dir)
        folder = Path(self.cfg.dir) if self.cfg.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)  # W&B writes <folder>/wandb/ and wants the folder made
        self._excepthook = sys.excepthook  # wandb.init replaces it (to note a crash); put back at the end
        # The process-wide W&B settings take the mode too: from them W&B decides whether it sends its own usage
        # telemetry (background threads that post to the W&B server at exit), which an offline run must not.
        wandb.setup(settings=wandb.Settings(mode=self.cfg.mode))
        try:
            self._run = wandb.init(
                project=self.cfg.project,
                name=self.cfg.name or run_dir.resolve().name,
                tags=list(self.cfg.tags),
                mode=self.cfg.mode,
                dir=str(folder),
                config=recipe_to_dict(self.recipe),
                id=self._run_id,
                resume="allow" if self._run_id else None,
            )
        except wandb.UsageError as error:  # e.g. online without credentials
            self._stop_wandb()
            raise ConfigError(
                None, "logging.wandb.mode", self.cfg.mode, f"W&B did not start: {_first_line(error)}",
                "run `wandb login` (or set WANDB_API_KEY), or use mode: offline",
            ) from None  # fmt: skip
        except BaseException:
            self._stop_wandb()
            raise
        self._run_id = self._run.id
        self._exit_code = 0

    def on_log(self, trainer: Trainer, kind: str, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        if kind == "summary":
            self._run.summary.update({f"summary/{k}": v for k, v in record.items() if v is not None})
        else:
            self._run.log(dict(scalars(kind, record)), step=record["step"])

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        if self._run is None:
            return
        if not isinstance(error, Preempted):
            self._exit_code = 1
            return
        try:
            self._run.mark_preempting()  # W&B shows it as preempted, not crashed, until it resumes
        except Exception as failure:  # noqa: BLE001 - the preemption must still end the run as planned
            log.warning("W&B run %s not marked as preempted: %s", self._run.id, failure)

    def on_close(self, trainer: Trainer) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=self._exit_code)
        except Exception as error:  # noqa: BLE001 - do not mask the error that ended the run
            log.warning("W&B run %s did not finish cleanly: %s", run.id, error)
        finally:
            self._stop_wandb()

    def _stop_wandb(self) -> None:
        """Stop W&B's service process (wandb-core, started by the first wandb.init) and give the excepthook back."""
        import wandb

        try:
            wandb.teardown()
        finally:
            sys.excepthook = self._excepthook

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id} if self._run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run_id = state.get("run_id")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
