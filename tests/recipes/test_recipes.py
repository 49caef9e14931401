"""Every shipped recipe loads, and its parameter count equals the same architecture built by `transformers`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.config.loader import load_recipe
from framework.convert.hf.configs import build_hf_model
from framework.models import build_model

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters are counted once


def test_the_zoo_is_shipped() -> None:
    names = {p.stem for p in RECIPES}
    assert {"debug", "llama-125m", "llama-1b", "llama-8b", "mistral-7b", "qwen3-0.6b"} <= names
    assert {"bert-base", "t5-base", "alibi-560m"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_parameter_count_matches_transformers(path: Path) -> None:
    recipe = load_recipe(path)
    with torch.device("meta"):
        ours = build_model(recipe.model)
        reference = build_hf_model(recipe.model)
    assert numel(ours) == numel(reference)


def size_overrides(recipe_path: Path, data_dir: Path, run_dir: Path) -> list[str]:
    """Shrink sizes only (layers, width, heads, vocab, batch, length); the architecture stays the recipe's."""
    from framework.data import Tokenizer

    recipe = load_recipe(recipe_path)
    vocab = Tokenizer(data_dir / "tokenizer.model").vocab_size
    sets = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.ffn_hidden=96"]
    sets += [f"model.vocab_size={vocab}", "data.seq_len=64", "train.steps=2"]
    sets += ["train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_batches=1"]
    if recipe.model.kv_heads is not None:
        sets.append("model.kv_heads=2")
    if recipe.model.head_dim is not None:
        sets.append("model.head_dim=8")
    if recipe.model.n_decoder_layers is not None:
        sets.append("model.n_decoder_layers=2")
    sets += [
        f"data.{k}={data_dir / f}" for k, f in (("tokenizer", "tokenizer.model"), ("train", "train.bin"))
    ]
    sets += [
        f"data.validation={data_dir / 'val.bin'}",
        f"logging.run_dir={run_dir}",
        "logging.progress_bar=false",
    ]
    return sets


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_shrunk_copy_trains_two_steps(path: Path, demo_data: Path, tmp_path: Path) -> None:
    import math

    from framework.run import train

    recipe = load_recipe(path, size_overrides(path, demo_data, tmp_path))
    metrics = train(recipe)
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]) and not metrics["skipped"]
    assert (tmp_path / "checkpoints" / "latest").exists()
