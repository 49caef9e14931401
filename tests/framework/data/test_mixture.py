"""Mixtures: proportions within 3 sigma (binomial) over 100k samples, deterministic by index, no sample skipped."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.order import BLOCK, SampleOrder, check_weights
from framework.data.source import build_data
from framework.data.tokenizer import Tokenizer

N = 100_000
WEIGHTS = [0.5, 0.3, 0.15, 0.05]
SIZES = [1000, 700, 50, 3]


def test_proportions_within_three_sigma_over_100k_samples() -> None:
    order = SampleOrder(SIZES, WEIGHTS, seed=7)
    counts = Counter(order.stream_position(g)[0] for g in range(N))
    for dataset, weight in enumerate(WEIGHTS):
        sigma = math.sqrt(N * weight * (1 - weight))
        assert abs(counts[dataset] - N * weight) <= 3 * sigma, (dataset, counts[dataset])


def test_each_dataset_stream_is_used_in_order_without_gaps_or_repeats() -> None:
    order = SampleOrder(SIZES, WEIGHTS, seed=7)
    streams: dict[int, list[int]] = {d: [] for d in range(len(SIZES))}
    for g in range(3 * BLOCK):
        dataset, index = order.stream_position(g)
        streams[dataset].append(index)
    for indices in streams.values():
        assert sorted(indices) == list(range(len(indices)))
    # epochs of the tiny dataset (3 samples) visit each of its samples once
    samples = [order(g) for g in range(3 * BLOCK)]
    tiny = [s for d, s in samples if d == 3]
    assert all(sorted(tiny[e * 3 : e * 3 + 3]) == [0, 1, 2] for e in range(len(tiny) // 3))


def test_random_access_equals_sequential_and_depends_on_seed() -> None:
    forwards = SampleOrder(SIZES, WEIGHTS, seed=7)
    sequential = [forwards(g) for g in range(2 * BLOCK)]
    backwards = SampleOrder(SIZES, WEIGHTS, seed=7)
    assert [backwards(g) for g in reversed(range(2 * BLOCK))][::-1] == sequential
    other = SampleOrder(SIZES, WEIGHTS, seed=8)
    assert [other(g) for g in range(2 * BLOCK)] != sequential


def test_default_weights_follow_sizes_and_bad_weights_are_config_errors() -> None:
    order = SampleOrder([300, 100], None, seed=0)
    assert np.array_equal(order.allocated(4000), [3000, 1000])
    for weights in ([1.0], [1.0, 0.0], [1.0, 1e-6]):
        with pytest.raises(ConfigError, match="data.weights"):
            check_weights(weights, 2)


def test_a_mixture_recipe_trains_from_both_datasets(prepared: Path, tiny_tokenizer: Tokenizer) -> None:
    cfg = DataConfig(
        tokenizer=str(tiny_tokenizer.path), train=[str(prepared)] * 2, validation=None, seq_len=16
    )
    source = build_data(replace(cfg, weights=[3.0, 1.0]), ModelConfig(vocab_size=512))[0]
    datasets = Counter(source.sample_id(g)[0] for g in range(2 * BLOCK))
    assert abs(datasets[0] - 1.5 * BLOCK) <= 2  # exact at block boundaries
    assert next(source.batches(4, 2))[0]["input_ids"].shape == (2, 16)
