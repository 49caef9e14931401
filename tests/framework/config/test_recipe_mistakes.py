"""Classes of recipe mistakes the loader refuses generically: non-finite floats, ints beyond int64 or the
documented bounds, floats where counts are wanted, duplicate keys, empty and non-mapping files, non-UTF-8 text."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from framework.config import ConfigError
from framework.config.loader import load_recipe
from framework.config.schema import MAX_LAYERS, MAX_STEPS, MAX_WIDTH

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
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides or [])
    err = info.value
    assert "\n" not in str(err)
    return err


# ----------------------------------------------------------------------------------------------- floats
@pytest.mark.parametrize(
    "bad", [".inf", "-.inf", ".nan", ".NaN", "+.inf", "inf", "nan", "1e999", "1" + "0" * 400]
)
@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("optim.lr", "optim:\n  lr: {}\n"),
        ("model.norm_eps", "  norm_eps: {}\n"),
        ("train.z_loss", "train:\n  z_loss: {}\n"),
        ("logging.peak_tflops", "logging:\n  peak_tflops: {}\n"),  # float | None
        ("model.softmax_scale", "  softmax_scale: {}\n"),  # 'inv_sqrt_dk' | 'none' | float
        ("optim.betas[1]", "optim:\n  betas: [0.9, {}]\n"),  # inside a tuple
    ],
)
def test_every_float_field_must_be_finite_in_a_file(tmp_path: Path, bad: str, key: str, field: str) -> None:
    # a line indented under `model:` goes into BASE's model section (a second `model:` would be a duplicate)
    text = (
        BASE.replace("model:\n", "model:\n" + field.format(bad))
        if field.startswith(" ")
        else BASE + field.format(bad)
    )
    path = write(tmp_path, "r.yaml", text)
    err = error_of(path)
    assert (err.file, err.key) == (str(path), key)
    assert "finite" in err.rule


@pytest.mark.parametrize(
    "override", ["optim.lr=.nan", "optim.lr=.inf", "optim.lr=-.inf", "model.rope_theta=.inf", "optim.eps=nan"]
)
def test_every_float_field_must_be_finite_in_set(tmp_path: Path, override: str) -> None:
    err = error_of(write(tmp_path, "r.yaml", BASE), [override])
    assert (err.file, err.key) == ("--set", override.split("=")[0]) and "finite" in err.rule


def test_finite_floats_still_load(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, "r.yaml", BASE), ["optim.lr=1e-3", "logging.peak_tflops=989", "optim.eps=1e-12"]
    )
    assert recipe.optim.lr == 1e-3 and recipe.logging.peak_tflops == 989.0
    assert all(math.isfinite(x) for x in (recipe.optim.lr, *recipe.optim.betas))


# ------------------------------------------------------------------------------------------------- ints
@pytest.mark.parametrize(
    ("override", "key", "rule"),
    [
        ("train.steps=1.0e+30", "train.steps", "whole number"),  # YAML float
        ("train.steps=1e30", "train.steps", "whole number"),  # YAML 1.1 text that is a number
        ("train.steps=4.0", "train.steps", "whole number"),
        ("train.steps=99999999999999999999999", "train.steps", "64-bit"),
        ("data.seed=-99999999999999999999999", "data.seed", "64-bit"),
        (f"train.steps={MAX_STEPS + 1}", "train.steps", "at most"),
        (f"model.n_layers={MAX_LAYERS + 1}", "model.n_layers", "at most"),
        ("model.n_layers=3000000000", "model.n_layers", "at most"),
        (f"model.d_model={MAX_WIDTH * 2}", "model.d_model", "at most"),
        ("model.vocab_size=100000000000", "model.vocab_size", "at most"),
        ("model.max_seq_len=10000000000", "model.max_seq_len", "at most"),
        ("train.global_batch_size=10000000000000", "train.global_batch_size", "at most"),
        ("parallel.tp=100000000", "parallel.tp", "at most"),
        ("model.moe={n_experts: 10000000, top_k: 1}", "model.moe.n_experts", "at most"),
        ("model.rope_low_freq_factor=0", "model.rope_low_freq_factor", "> 0"),  # a divisor in llama3 scaling
        ("model.rope_original_max_seq_len=0", "model.rope_original_max_seq_len", "> 0"),
        ("train.steps=0", "train.steps", "> 0"),
    ],
)
def test_sizes_and_counts_are_bounded(tmp_path: Path, override: str, key: str, rule: str) -> None:
    err = error_of(write(tmp_path, "r.yaml", BASE), [override])
    assert (err.file, err.key) == ("--set", key) and rule in err.rule


def test_float_count_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE + "train:\n  steps: 1e30\n")
    err = error_of(path)
    assert (err.file, err.key) == (str(path), "train.steps") and "whole number" in err.rule


def test_divisor_hints_of_huge_numbers_are_prompt(tmp_path: Path) -> None:
    # the fix lists divisors of n_heads: found up to sqrt(n), not by a loop to n
    err = error_of(
        write(tmp_path, "r.yaml", BASE), ["model.n_heads=65536", "model.kv_heads=3", "model.head_dim=2"]
    )
    assert err.key == "model.kv_heads" and "1, 2, 4" in err.fix


# ------------------------------------------------------------------------------------------ duplicates
@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("model:\n  n_layers: 2\n  d_model: 64\n  n_layers: 3\n", "model.n_layers", (2, 4)),
        ("model:\n  n_layers: 2\ntrain:\n  steps: 3\nmodel:\n  d_model: 64\n", "model", (1, 5)),
        ("model:\n  moe:\n    top_k: 1\n    top_k: 2\n", "model.moe.top_k", (3, 4)),
        ("optim: {lr: 0.1, lr: 0.2}\n", "optim.lr", (1, 1)),
        ("launch:\n  env: [{A: 1, A: 2}]\n", "launch.env[0].A", (2, 2)),
    ],
)
def test_duplicate_keys_name_both_lines(tmp_path: Path, text: str, key: str, lines: tuple[int, int]) -> None:
    path = write(tmp_path, "r.yaml", text)
    err = error_of(path)
    assert err.key == key and err.file == f"{path}:{lines[1]}"
    assert f"lines {lines[0]} and {lines[1]}" in str(err) and "twice" in err.rule


def test_duplicate_keys_in_a_base_file_and_in_set(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE + "train:\n  steps: 2\n  steps: 3\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  n_layers: 3\n")
    err = error_of(child)
    assert err.key == "train.steps" and err.file.startswith(f"{base}:")
    err = error_of(write(tmp_path, "r.yaml", BASE), ["model={n_layers: 2, n_layers: 3}"])
    assert (err.file, err.key) == ("--set", "model.n_layers") and "twice" in err.rule


def test_merge_keys_may_override_and_tags_stay_refused(tmp_path: Path) -> None:
    text = BASE + "train: &t\n  steps: 3\nschedule:\n  warmup_steps: 1\ncheckpoint:\n  every: 1\n"
    recipe = load_recipe(write(tmp_path, "r.yaml", text + "logging:\n  <<: {log_every: 1}\n  log_every: 2\n"))
    assert recipe.logging.log_every == 2 and recipe.train.steps == 3
    err = error_of(write(tmp_path, "bad.yaml", "model: !!python/object/apply:os.system ['true']\n"))
    assert "YAML" in err.rule
    err = error_of(write(tmp_path, "key.yaml", "? !!python/name:os.system\n: 1\n"))
    assert "YAML" in err.rule


# ------------------------------------------------------------------------------ empty, non-mapping, bytes
@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "~\n", "---\n"])
def test_an_empty_recipe_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "r.yaml", text)
    err = error_of(path)
    assert (err.file, err.key) == (str(path), "recipe") and "is empty" in err.rule


def test_an_empty_base_is_refused_and_explicit_defaults_load(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "# nothing yet\n")
    err = error_of(write(tmp_path, "child.yaml", "base: base.yaml\n"))
    assert err.file == str(base) and "is empty" in err.rule
    assert load_recipe(write(tmp_path, "defaults.yaml", "{}\n")).model.n_layers == 8


@pytest.mark.parametrize("text", ["- model\n- train\n", "42\n", "just text\n", "[1, 2]\n"])
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    err = error_of(write(tmp_path, "r.yaml", text))
    assert err.key == "recipe" and "mapping" in err.rule


@pytest.mark.parametrize(
    ("raw", "offset"),
    [
        (b"model:\n  n_layers: 2 # caf\xe9\n", 26),  # latin-1
        (b"\xff\xfem\x00o\x00", 0),  # UTF-16
        (b"model:\n  n_layers: 2\n\x80", 21),  # a stray continuation byte at the end
    ],
)
def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path: Path, raw: bytes, offset: int) -> None:
    path = write(tmp_path, "r.yaml", raw)
    err = error_of(path)
    assert err.file == str(path) and "UTF-8" in err.rule and f"offset {offset}" in err.rule


def test_a_utf8_recipe_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", b"\xef\xbb\xbf" + BASE.encode() + "# café\n".encode())
    assert load_recipe(path).model.n_layers == 2


@pytest.mark.parametrize(
    ("anchor", "alias"),
    [("[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]", "[{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}]"),
     ("{{x: 1, y: 1}}", "{{p: {0}, q: {0}}}")],
)  # fmt: skip
def test_a_yaml_alias_bomb_is_refused_promptly(tmp_path: Path, anchor: str, alias: str) -> None:
    # nested aliases expand to billions of values: every later step (merge, origins, conversion) would hang
    lines = [f"a0: &a0 {anchor.format()}"]
    lines += [f"a{i}: &a{i} {alias.format(f'*a{i - 1}')}" for i in range(1, 40)]
    path = write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    err = error_of(path)
    assert (err.file, err.key) == (str(path), "recipe") and "aliases" in err.rule


def test_plain_aliases_still_load(tmp_path: Path) -> None:
    text = (
        BASE + "optim:\n  betas: &b [0.8, 0.9]\nschedule:\n  warmup_steps: &w 5\ntrain:\n  eval_every: *w\n"
    )
    recipe = load_recipe(write(tmp_path, "r.yaml", text))
    assert recipe.optim.betas == (0.8, 0.9) and recipe.train.eval_every == 5


@pytest.mark.parametrize(
    ("text", "value"),
    [("3:00", "3:00"), ("1:30:00", "1:30:00"), ("-1:30", "-1:30"), ("1:30.5", "1:30.5"), ("190", 190),
     ("0x1f", 31), ("1_000", 1000), ("2.0e-3", 0.002), (".inf", float("inf"))],
)  # fmt: skip
def test_no_base_60_numbers_other_yaml_numbers_as_before(text: str, value: object) -> None:
    """YAML 1.1's sexagesimal ints/floats (3:00 -> 180) are read as text, as YAML 1.2 and Slurm do."""
    import yaml

    from framework.config.loader import _RecipeLoader

    assert yaml.load(f"a: {text}", Loader=_RecipeLoader)["a"] == value  # noqa: S506 (a SafeLoader)
