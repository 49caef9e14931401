"""Recipe loading: every category of user mistake gives a ConfigError naming file, key, value, rule and fix."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from framework.config import ConfigError, Recipe
from framework.config.docs import field_docs
from framework.config.loader import dump_recipe, load_recipe
from framework.config.schema import SECTIONS, MoEConfig, WandbConfig

BASE = """
model:
  d_model: 64
  n_layers: 2
  n_heads: 4
  ffn_hidden: 128
  vocab_size: 512
  max_seq_len: 128
data:
  seq_len: 64
optim:
  lr: 1e-3
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides or [])
    return info.value


def test_loads_types_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    recipe = load_recipe(path, ["model.kv_heads=2", "optim.betas=[0.8, 0.9]", "data.validation=null"])
    assert recipe.model.kv_heads == 2 and recipe.model.n_layers == 2
    assert recipe.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; floats accept it
    assert recipe.optim.betas == (0.8, 0.9)
    assert recipe.data.validation is None
    assert recipe.train.steps == Recipe().train.steps  # untouched fields keep their defaults


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", BASE), ["model.softmax_scale=0.5"])
    again = load_recipe(write(tmp_path, "dumped.yaml", dump_recipe(recipe)))
    assert again == recipe


def test_base_deep_merges_and_child_wins(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  n_layers: 3\n")
    recipe = load_recipe(child)
    assert recipe.model.n_layers == 3 and recipe.model.d_model == 64


@pytest.mark.parametrize(
    ("text", "overrides", "key", "fix_contains"),
    [
        ("modle:\n  n_layers: 2\n", [], "modle", "did you mean 'model'"),
        ("model:\n  n_layer: 2\n", [], "model.n_layer", "did you mean 'n_layers'"),
        ("model:\n  n_layers: two\n", [], "model.n_layers", "e.g. 4"),
        ("model:\n  tie_embeddings: 1\n", [], "model.tie_embeddings", "true or false"),
        ("model:\n  mlp: swigl\n", [], "model.mlp", "did you mean 'swiglu'"),
        ("model:\n  dropout: 1.5\n", [], "model.dropout", "fraction"),
        ("model:\n  n_layers: 0\n", [], "model.n_layers", "positive"),
        ("optim:\n  betas: [0.9]\n", [], "optim.betas", "give 2 values"),
        ("optim:\n  betas: [0.9, 1.5]\n", [], "optim.betas[1]", "0.95"),
    ],
)
def test_mistakes_in_a_file(
    tmp_path: Path, text: str, overrides: list[str], key: str, fix_contains: str
) -> None:
    path = write(tmp_path, "r.yaml", text)
    err = error_of(path, overrides)
    assert err.key == key and err.file == str(path)
    assert fix_contains in err.fix
    assert str(err).startswith(f"{path}: {key} = ") and "\n" not in str(err)


@pytest.mark.parametrize(
    ("overrides", "key", "rule_contains"),
    [
        (["model.d_model=66"], "model.d_model", "divisible by model.n_heads=4"),
        (["model.kv_heads=3"], "model.kv_heads", "must be divisible by kv_heads"),
        (["model.position=rope", "model.head_dim=15"], "model.head_dim", "even"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size", "multiple"),
        (["data.objective=mlm"], "data.objective", "model.family=decoder"),
        (["data.seq_len=4096"], "data.seq_len", "max_seq_len"),
    ],
)
def test_cross_field_rules(tmp_path: Path, overrides: list[str], key: str, rule_contains: str) -> None:
    err = error_of(write(tmp_path, "r.yaml", BASE), overrides)
    assert err.key == key and rule_contains in err.rule
    assert err.file == "--set"  # the override that broke the rule is blamed, not the file


def test_unknown_set_key_and_bad_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    err = error_of(path, ["model.nlayers=3"])
    assert (err.file, err.key) == ("--set", "model.nlayers") and "n_layers" in err.fix
    err = error_of(path, ["modl.n_layers=3"])
    assert (err.file, err.key) == ("--set", "modl") and "model" in err.fix
    for bad in ("model.n_layers", "=3", "model..x=1", "model.n-layers=2"):
        err = error_of(path, [bad])
        assert err.file == "--set" and "section.key=value" in err.rule
    err = error_of(path, ["model.n_layers=[1"])
    assert "YAML" in err.rule


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  n_layers: 2\n  d_model: [64\ntrain:\n  steps: 3\n")
    err = error_of(path)
    assert "YAML syntax error" in err.rule
    assert err.file.startswith(f"{path}:") and "line" in str(err.value)


def test_missing_and_cyclic_base(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "r.yaml", "base: nowhere.yaml\n"))
    assert err.key == "base" and "not found" in err.rule
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    err = error_of(tmp_path / "a.yaml")
    assert err.key == "base" and "cycle" in err.rule and "a.yaml -> b.yaml -> a.yaml" in err.rule


def test_missing_recipe_and_non_mapping(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "absent.yaml").rule
    assert "mapping" in error_of(write(tmp_path, "r.yaml", "- a\n- b\n")).rule


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "r.yaml", "model: !!python/object/apply:os.system ['true']\n"))
    assert "YAML" in err.rule


def test_every_field_is_documented() -> None:
    nested = (MoEConfig, WandbConfig)  # sections inside sections (model.moe, logging.wandb)
    for cls in [type(getattr(Recipe(), section)) for section in SECTIONS] + list(nested):
        docs = field_docs(cls)
        missing = [name for name, doc in docs.items() if len(doc) < 10]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert set(field_docs(Recipe)) == set(SECTIONS)
    assert all(dataclasses.is_dataclass(getattr(Recipe(), s)) for s in SECTIONS)


def test_moe_section_loads_and_its_mistakes_name_the_nested_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "moe.yaml",
        BASE.replace("  max_seq_len: 128\n", "  max_seq_len: 128\n  moe:\n    top_k: 1\n"),
    )
    recipe = load_recipe(path, ["model.moe.n_experts=4"])
    assert recipe.model.moe == MoEConfig(n_experts=4, top_k=1)
    assert load_recipe(write(tmp_path, "dense.yaml", BASE)).model.moe is None
    assert load_recipe(write(tmp_path, "again.yaml", dump_recipe(recipe))) == recipe
    err = error_of(path, ["model.moe.top_k=5", "model.moe.n_experts=4"])
    assert (err.file, err.key, err.value) == ("--set", "model.moe.top_k", 5) and "n_experts=4" in err.rule
    err = error_of(path, ["model.moe.topk=2"])
    assert err.key == "model.moe.topk" and "top_k" in err.fix
    err = error_of(path, ["model.moe.router=softmx"])
    assert err.key == "model.moe.router" and "softmax" in err.fix
    err = error_of(path, ["model.moe.first_dense=2"])
    assert err.key == "model.moe.first_dense" and "n_layers=2" in err.rule
