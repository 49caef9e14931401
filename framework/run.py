"""The path of one run: build (model, data, train module, callbacks) -> fit. `loom train` calls `train`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.config.loader import dump_recipe
from framework.config.schema import ModelConfig, Recipe
from framework.data import Tokenizer, TrainSource, ValidationSource, build_data
from framework.models import build_model, init_weights
from framework.models.flops import flops_per_token
from framework.train import Trainer, TrainModule, default_callbacks, resolve_device


def materialize_model(cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    """Build on the meta device (no memory, no init work), allocate on `device`, then initialise every tensor
    from (seed, parameter name) so any later layout holds the same weights."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    init_weights(model, cfg, seed)
    return model


def train(
    recipe: Recipe, *, recipe_path: str | Path | None = None, resume: str | None = None
) -> dict[str, Any]:
    """Train `recipe` in this process; returns the last step's metrics."""
    device = resolve_device(recipe.train.device)
    torch.manual_seed(recipe.train.seed)  # dropout RNG; parameters are seeded by name
    tokenizer = Tokenizer(recipe.data.tokenizer)
    train_source, val_source = build_data(recipe.data, recipe.model, tokenizer)
    model = materialize_model(recipe.model, device, recipe.train.seed)
    module = TrainModule(model, recipe, device)
    _write_resolved_recipe(recipe)
    callbacks = default_callbacks(
        recipe,
        val_batches=None if val_source is None else ValidationBatches(val_source, recipe),
        flops_per_token=flops_per_token(recipe.model, recipe.data.seq_len, training=True),
        resume=resume,
    )
    return Trainer(module, StepBatches(train_source, recipe), callbacks, recipe).fit() or {}


class StepBatches:
    """Per-step micro-batches of a data source; its state (consumed samples, seed) is checkpointed by the trainer.
    The stream starts when iterated, i.e. after a resume has restored the state."""

    def __init__(self, source: TrainSource, recipe: Recipe) -> None:
        self.source = source
        self.global_batch_size = recipe.train.global_batch_size
        self.micro_batch_size = recipe.train.micro_batch_size

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        return self.source.batches(self.global_batch_size, self.micro_batch_size)

    def state_dict(self) -> dict[str, int]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.source.load_state_dict(state)


def _write_resolved_recipe(recipe: Recipe) -> None:
    """The run directory records exactly what ran (the resolved recipe, defaults included)."""
    run_dir = Path(recipe.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))


class ValidationBatches:
    """Re-iterable held-out micro-batches: every evaluation sees the same train.eval_batches batches."""

    def __init__(self, source: ValidationSource, recipe: Recipe) -> None:
        self.source = source
        self.micro_batch_size = recipe.train.micro_batch_size
        self.num_batches = recipe.train.eval_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.source.batches(self.micro_batch_size, self.num_batches)
