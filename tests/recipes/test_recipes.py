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
