"""Tiny contract-following models, recipes and batches for the training-engine tests."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.config import Recipe
from framework.train.callbacks.base import Callback

VOCAB = 32


class TinyLM(nn.Module):
    """forward(input_ids, **kw) -> logits [B, S, vocab], with the contract's module names."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.w1 = nn.Linear(dim, 4 * dim)
        self.w2 = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        h = self.tok_embeddings(input_ids)
        # Causal running mean mixes positions, so a token's logits depend on its prefix.
        steps = torch.arange(1, h.shape[1] + 1, device=h.device).view(1, -1, 1)
        h = h + h.cumsum(dim=1) / steps
        h = h + self.dropout(self.w2(F.gelu(self.w1(self.ffn_norm(h)))))
        return self.output(self.norm(h))


def make_model(seed: int = 0, **kwargs: Any) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs)


def make_recipe(run_dir: Any, overrides: dict[str, Any] | None = None) -> Recipe:
    """A small CPU recipe: constant LR without warmup, no progress bar or TensorBoard unless overridden."""
    recipe = Recipe()
    defaults = {
        "logging.run_dir": str(run_dir),
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "train.steps": 6,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "schedule.name": "constant",
        "schedule.warmup_steps": 0,
        "optim.lr": 1e-2,
        "checkpoint.save_final": False,
    }
    for dotted, value in {**defaults, **(overrides or {})}.items():
        section, key = dotted.split(".")
        setattr(getattr(recipe, section), key, value)
    recipe.validate()
    return recipe


def make_batch(
    generator: torch.Generator, batch: int = 4, seq: int = 8, ignore_prob: float = 0.25
) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    ignored = torch.rand(batch, seq, generator=generator) < ignore_prob
    return {"input_ids": input_ids, "labels": labels.masked_fill(ignored, -100)}


def make_batches(n: int, seed: int = 0, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(generator, **kwargs) for _ in range(n)]


class IndexedBatches:
    """A re-startable batch source with a checkpointable position, like the real data loaders."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.position = 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def snapshot(module: Any) -> dict[str, torch.Tensor]:
    """Clones of every parameter and every optimizer-state tensor, keyed by name."""
    out = {f"param/{n}": p.detach().clone() for n, p in module.model.named_parameters()}
    state = module.state_dict()["optimizer"]["state"]
    for name, entries in state.items():
        for key, value in entries.items():
            out[f"optim/{name}/{key}"] = value.detach().clone()
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def tiny_debug_recipe(run_dir: Any, demo_data: Any, overrides: list[str] | None = None) -> Recipe:
    """recipes/debug.yaml on the demo data, cut to a 1-layer model and a dozen steps for the in-process runs
    of framework.run.train (all default callbacks), with validation at step 6 and at the end."""
    from pathlib import Path

    from framework.config.loader import load_recipe

    sets = {
        "logging.run_dir": run_dir, "logging.progress_bar": "false", "logging.tensorboard": "false",
        "data.tokenizer": Path(demo_data) / "tokenizer.model", "data.train": demo_data,
        "data.validation": demo_data, "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
        "model.kv_heads": 1, "model.ffn_hidden": 64, "train.steps": 12, "train.global_batch_size": 2,
        "train.micro_batch_size": 2, "train.eval_every": 6, "train.eval_batches": 1, "schedule.warmup_steps": 2,
    }  # fmt: skip
    root = Path(__file__).resolve().parents[3]
    items = [f"{key}={value}" for key, value in sets.items()] + list(overrides or [])
    return load_recipe(root / "recipes" / "debug.yaml", items)


class SignalAt(Callback):
    """Plays the signal handler: after `step`, the Checkpointer's guard has received SIGUSR1 (the Checkpointer
    then saves and raises Preempted)."""

    def __init__(self, checkpointer: Any, step: int) -> None:
        self.checkpointer, self.step = checkpointer, step

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if metrics["step"] == self.step:
            self.checkpointer.signal.received = signal.SIGUSR1


def demo_run_recipe(
    run_dir: Any, data: Any, *, steps: int, global_batch: int, micro_batch: int, every: int = 0, **model: Any
) -> Recipe:
    """A 2-block decoder (width 32, `model` overrides) on the demo corpus for in-process `framework.run.train` runs:
    CPU, no validation, a checkpoint every `every` steps (0: only the final one), no progress bar or TensorBoard."""
    from pathlib import Path

    from framework.config import ModelConfig

    sizes = dict(vocab_size=4096, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=128)
    recipe = Recipe(model=ModelConfig(**sizes | model))
    data = Path(data)
    recipe.data.tokenizer, recipe.data.train, recipe.data.validation = (
        str(data / "tokenizer.model"),
        str(data),
        None,
    )
    recipe.data.seq_len, recipe.data.verify = 128, "size"
    recipe.train.steps, recipe.train.global_batch_size, recipe.train.micro_batch_size = (
        steps,
        global_batch,
        micro_batch,
    )
    recipe.train.device, recipe.train.eval_every = "cpu", 0
    recipe.checkpoint.every, recipe.checkpoint.keep_last = every, 10
    recipe.logging.run_dir = str(run_dir)
    recipe.logging.progress_bar = recipe.logging.tensorboard = False
    return recipe
