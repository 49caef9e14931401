"""check_fits / fit_of: a recipe's memory need against a device's, before anything is allocated."""

from __future__ import annotations

import dataclasses

import pytest

from framework.config import ConfigError
from framework.config.schema import DeepSpeedConfig, ModelConfig, ParallelConfig, Recipe
from framework.models.flops import param_counts
from framework.models.memory import check_fits, device_memory, fit_of, memory_per_rank

GIB = 2**30
SMALL = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64)


def _recipe(**model: object) -> Recipe:
    return dataclasses.replace(Recipe(), model=dataclasses.replace(SMALL, **model))


def test_one_process_needs_the_whole_estimate_of_its_layout_free_run() -> None:
    recipe = dataclasses.replace(
        _recipe(), parallel=ParallelConfig(tp=4, dp_shard=2)
    )  # ignored by one process
    fit = fit_of(recipe, 1, "cpu", limit=(GIB, "test RAM"))
    assert fit.need == memory_per_rank(_recipe(), device="cpu")["total"] and fit.fits
    assert (fit.limit, fit.where) == (GIB, "test RAM")


def test_more_ranks_need_at_least_the_state_spread_over_all_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    recipe = _recipe()
    state = param_counts(recipe.model)["total"] * 16  # fp32 weights, gradients, exp_avg, exp_avg_sq
    assert fit_of(recipe, 8, "cuda:0", limit=(GIB, "gpu")).need == -(-state // 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # ranks on one CPU share its RAM
    assert fit_of(recipe, 8, "cpu", limit=(GIB, "ram")).need == 4 * -(-state // 8)


@pytest.mark.parametrize(
    "model",
    [
        dict(d_model=2**20, n_heads=1, kv_heads=1),  # 25 TB of embeddings and weights
        dict(vocab_size=2**24, d_model=4096, n_heads=32),
        dict(n_layers=10_000, d_model=8192, ffn_hidden=32768, n_heads=64),
    ],
)
def test_a_model_too_big_for_the_device_is_one_error_naming_size_and_limit(model: dict[str, int]) -> None:
    recipe = _recipe(**model)
    with pytest.raises(ConfigError) as info:
        check_fits(recipe, 1, "cpu")
    err = info.value
    total = param_counts(recipe.model)["total"]
    assert err.key == "model" and f"{total:,} parameters" == err.value
    limit_gib = f"{device_memory('cpu')[0] / GIB:,.1f} GiB"
    assert limit_gib in err.rule and f"d_model {recipe.model.d_model}" in err.rule
    assert "smaller model" in err.fix and "--nproc" in err.fix and "\n" not in str(err)


def test_a_tiny_model_fits_this_machine() -> None:
    fit = check_fits(_recipe(), 1, "cpu")
    assert 0 < fit.need < fit.limit


def test_offloaded_state_is_not_counted_on_the_gpu() -> None:
    recipe = dataclasses.replace(
        _recipe(),
        parallel=ParallelConfig(engine="deepspeed"),
        deepspeed=DeepSpeedConfig(offload_optimizer="cpu"),
    )
    fit = fit_of(recipe, 1, "cuda:0", limit=(GIB, "gpu"))
    assert fit.need == memory_per_rank(_recipe(), device="cuda")["activations"]
    assert "offloaded" in fit.what


def test_sizes_overflowing_int64_are_refused() -> None:
    # past the schema's bounds (a recipe cannot reach this), the arithmetic still refuses rather than overflow
    recipe = _recipe(d_model=2**40, n_heads=1, kv_heads=1, ffn_hidden=2**40, vocab_size=2**24)
    with pytest.raises(ConfigError, match="overflow a 64-bit integer"):
        fit_of(recipe, 1, "cpu", limit=(GIB, "ram"))


def test_device_memory_reads_this_machine() -> None:
    ram, where = device_memory("cpu")
    assert ram > 2**28 and "machine" in where
