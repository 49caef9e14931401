"""The multi-process helper: results in rank order, child errors with tracebacks, the pool survives a failure."""

from __future__ import annotations

import pytest
from dist_helpers import DistError


def test_runs_on_every_rank(dist_pool) -> None:
    assert dist_pool(2).run("dist_cases:rank_sum") == [(0, 1.0), (1, 1.0)]


def test_child_error_is_raised_with_its_traceback_and_the_pool_recovers(dist_pool) -> None:
    pool = dist_pool(2)
    with pytest.raises(DistError, match="(?s)rank 1.*ValueError: rank one failed on purpose"):
        pool.run("dist_cases:fail_on_rank_one")
    assert pool.run("dist_cases:rank_sum") == [(0, 1.0), (1, 1.0)]
