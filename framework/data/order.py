"""The training order: global sample index g -> (dataset, sample), a seeded function of g only.

One dataset: epoch e = g // n visits the n samples in a permutation drawn from (seed, e).
A mixture: g falls in block b = g // BLOCK. Dataset d's cumulative share after N samples is
A_d(N) = floor(N * C_{d+1}) - floor(N * C_d), with C the cumulative normalised weights, so block b holds exactly
A_d((b+1) * BLOCK) - A_d(b * BLOCK) samples of d, placed at positions given by a seeded permutation of the block.
The k-th of them is d's stream index A_d(b * BLOCK) + k, and d's stream is ordered like a single dataset (with
its own seed stream). Proportions are therefore exact to within two samples at every block boundary (and
between boundaries vary only as much as a random draw without replacement from the block), each dataset's samples
are used once per its epoch, and nothing depends on batch size, ranks, workers or resumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from framework.config.errors import ConfigError

BLOCK = 8192
# Independent random streams derived from one seed.
ORDER, TRAIN, VALIDATION, MIXTURE = 0, 1, 2, 3


def seed_sequence(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    """SeedSequence hashes its words well (nearby seeds give unrelated streams) and is stable across numpy
    versions."""
    return np.random.SeedSequence([seed % 2**64, stream, index])


class EpochOrder:
    """Stream index j of one dataset of n samples -> sample number, reshuffled every epoch."""

    def __init__(self, num_samples: int, seed: int, dataset: int = 0) -> None:
        self.num_samples, self.seed, self.dataset = num_samples, seed, dataset
        self._epoch: tuple[int, np.ndarray] | None = None  # the current epoch's permutation, cached

    def __call__(self, index: int) -> int:
        epoch, position = divmod(index, self.num_samples)
        if self._epoch is None or self._epoch[0] != epoch:
            # Dataset d's permutations come from stream index (d, epoch), packed into one word.
            rng = np.random.default_rng(seed_sequence(self.seed, ORDER, epoch * 2**16 + self.dataset))
            self._epoch = (epoch, rng.permutation(self.num_samples))
        return int(self._epoch[1][position])


class SampleOrder:
    """Global sample index -> (dataset number, sample number in that dataset)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None, seed: int) -> None:
        self.seed = seed
        self.orders = [EpochOrder(n, seed, d) for d, n in enumerate(sizes)]
        shares = np.asarray(weights if weights is not None else sizes, dtype=np.float64)
        self.cumulative = np.concatenate([[0.0], np.cumsum(shares / shares.sum())])
        self.cumulative[-1] = 1.0
        self._block: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __call__(self, index: int) -> tuple[int, int]:
        if len(self.orders) == 1:
            return 0, self.orders[0](index)
        dataset, stream_index = self.stream_position(index)
        return dataset, self.orders[dataset](stream_index)

    def allocated(self, count: int) -> np.ndarray:
        """How many of the first `count` global samples each dataset supplies (sums to count)."""
        floors = np.array([math.floor(count * c) for c in self.cumulative], dtype=np.int64)
        return np.diff(floors)

    def stream_position(self, index: int) -> tuple[int, int]:
        """(dataset, index in that dataset's stream) of global sample `index`."""
        block, offset = divmod(index, BLOCK)
        if self._block is None or self._block[0] != block:
            self._block = (block, self.allocated(block * BLOCK), *self._layout(block))
        _, before, datasets, ranks = self._block
        dataset = int(datasets[offset])
        return dataset, int(before[dataset] + ranks[offset])

    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        counts = self.allocated((block + 1) * BLOCK) - self.allocated(block * BLOCK)
        rng = np.random.default_rng(seed_sequence(self.seed, MIXTURE, block))
        datasets = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        # ranks[p]: how many earlier positions of the block hold the same dataset.
        by_dataset = np.argsort(datasets, kind="stable")
        ranks = np.empty(BLOCK, dtype=np.int64)
        ranks[by_dataset] = np.arange(BLOCK) - np.repeat(np.cumsum(counts) - counts, counts)
        return datasets, ranks


def check_weights(weights: Sequence[float] | None, count: int) -> None:
    """data.weights: one positive weight per training dataset, none below 2 / BLOCK of the total (a smaller
    share could get a negative count in some block of the exact interleaving)."""
    if weights is None:
        return
    if len(weights) != count:
        raise ConfigError(
            None,
            "data.weights",
            list(weights),
            f"needs one weight per data.train dataset ({count})",
            f"give {count} weights, or null for shares proportional to sizes",
        )
    total = sum(weights)
    if any(w <= 0 for w in weights) or min(weights) / total < 2 / BLOCK:
        raise ConfigError(
            None,
            "data.weights",
            list(weights),
            f"every weight must be > 0 and at least {2 / BLOCK:.2g} of the total",
            "raise the smallest weight or drop that dataset",
        )
