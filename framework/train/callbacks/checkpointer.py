"""Saves checkpoints every checkpoint.every steps and at the end; resumes from one at fit start."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.checkpoint import (
    LoadedCheckpoint,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    set_rng_state,
)
from framework.config import Recipe
from framework.config.loader import recipe_to_dict
from framework.train.callbacks.base import Callback

if TYPE_CHECKING:
    from framework.train.trainer import Trainer


class Checkpointer(Callback):
    """Checkpoints under checkpoint.dir (default <logging.run_dir>/checkpoints).

    `resume`: a step directory or checkpoint root to load at fit start; "auto" = the root's latest checkpoint if
    there is one; None = start fresh. A checkpoint holds the train module's state, the data position, the
    callbacks' state and every RNG state, so the resumed run continues exactly as the uninterrupted one would.
    """

    def __init__(self, recipe: Recipe, *, resume: str | Path | None = None, rank: int = 0) -> None:
        self.recipe = recipe
        self.cfg = recipe.checkpoint
        self.root = Path(self.cfg.dir) if self.cfg.dir else Path(recipe.logging.run_dir) / "checkpoints"
        self.resume = resume
        self.rank = rank
        self._last_saved: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.rank == 0:
            remove_stale_temps(self.root)  # leftovers of a crashed save; none can be in flight now
        path = latest_checkpoint(self.root) if self.resume == "auto" else self.resume
        if path is not None:
            self.load(trainer, path)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.cfg.every and trainer.step % self.cfg.every == 0:
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.cfg.save_final and self._last_saved != trainer.step:
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path:
        module = trainer.train_module
        metadata = {
            "tokens": module.tokens,
            "recipe": recipe_to_dict(self.recipe),
            "data_state": trainer.data_state(),
            "rng": get_rng_state(module.device),
            "callbacks": trainer.callback_states(),
        }
        path = save_checkpoint(self.root, module.step, module.state_dict(), metadata, self.cfg.keep_last)
        self._last_saved = module.step
        return path

    def load(self, trainer: Trainer, path: str | Path) -> LoadedCheckpoint:
        module = trainer.train_module
        loaded = load_checkpoint(path, template=module.state_dict())
        module.load_state_dict(loaded.state)
        trainer.load_data_state(loaded.metadata.get("data_state"))
        trainer.load_callback_states(loaded.metadata.get("callbacks", {}))
        # Last, so that nothing above can draw from the generators after they are restored.
        set_rng_state(loaded.metadata["rng"], module.device)
        self._last_saved = module.step
        return loaded
