"""Writes <run_dir>/recipe.yaml, the resolved recipe (defaults included) of what ran.

Last of the default callbacks, so it writes only after every other on_fit_start succeeded: a resume the
Checkpointer refuses (damaged checkpoint, another model) leaves the run directory's recipe.yaml as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from framework.config import Recipe
from framework.config.loader import dump_recipe
from framework.outputs import atomic_file
from framework.train.callbacks.base import Callback

if TYPE_CHECKING:
    from framework.train.trainer import Trainer


class RecipeRecord(Callback):
    """Rank 0 writes the resolved recipe atomically (temp sibling + rename) at fit start."""

    def __init__(self, recipe: Recipe, rank: int = 0) -> None:
        self.recipe = recipe
        self.rank = rank

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.rank != 0:
            return
        with atomic_file(Path(self.recipe.logging.run_dir) / "recipe.yaml", overwrite=True) as tmp:
            tmp.write_text(dump_recipe(self.recipe))
