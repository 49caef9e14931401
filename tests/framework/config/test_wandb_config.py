"""logging.wandb (WandbConfig): off by default, loads from YAML and --set, and every bad value is a ConfigError
naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.config import ConfigError, WandbConfig
from framework.config.loader import load_recipe

RECIPE = """
model: {d_model: 64, n_layers: 2, n_heads: 4, ffn_hidden: 128, vocab_size: 512, max_seq_len: 128}
data: {seq_len: 64}
"""


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_default_is_off_and_a_section_loads(recipe_path: Path) -> None:
    assert load_recipe(recipe_path).logging.wandb == WandbConfig(mode="disabled", project=None, tags=[])
    recipe_path.write_text(
        RECIPE + "logging:\n  wandb: {mode: offline, project: p1, tags: [a, b], dir: /tmp/w}\n"
    )
    got = load_recipe(recipe_path, ["logging.wandb.name=first try"]).logging.wandb
    assert got == WandbConfig(mode="offline", project="p1", name="first try", tags=["a", "b"], dir="/tmp/w")


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("logging.wandb.mode=cloud", "logging.wandb.mode", "one of"),
        ("logging.wandb.mode=true", "logging.wandb.mode", "one of"),
        ("logging.wandb.project=team/proj", "logging.wandb.project", "without /"),
        ("logging.wandb.project=''", "logging.wandb.project", "1-128 characters"),
        (f"logging.wandb.project={'p' * 129}", "logging.wandb.project", "1-128 characters"),
        ("logging.wandb.project=3", "logging.wandb.project", "must be str"),
        ("logging.wandb.name=' '", "logging.wandb.name", "must not be empty"),
        ("logging.wandb.dir=''", "logging.wandb.dir", "must not be empty"),
        ("logging.wandb.tags=solo", "logging.wandb.tags", "must be a list"),
        ("logging.wandb.tags=[a, '']", "logging.wandb.tags[1]", "1-64 characters"),
        (f"logging.wandb.tags=[{'t' * 65}]", "logging.wandb.tags[0]", "1-64 characters"),
        ("logging.wandb.tags=[a, b, a]", "logging.wandb.tags", "twice"),
        ("logging.wandb.projet=p", "logging.wandb.projet", "unknown key"),
        ("logging.wandb=offline", "logging.wandb", "mapping"),
    ],
)
def test_bad_values_are_config_errors(recipe_path: Path, override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe_path, [override])
    assert info.value.key == key and info.value.file == "--set"
    assert words in info.value.rule, info.value.rule
