"""Sharded validation on real process groups: the held-out batches are split over the data-parallel ranks (tensor
parallel peers evaluate the same ones), the sums are added over the dp group, and the result equals the same
callback on one process over the same batches, at ceil(n / dp) forwards per rank, also for uneven counts."""

from __future__ import annotations

import math

import pytest

CASES = {
    # (world, parallel, eval_batches, available held-out batches)
    "ddp2_uneven": (2, {"data_parallel": "ddp"}, 5, 5),
    "fsdp2_uneven": (2, {"data_parallel": "fsdp"}, 5, 5),
    "fsdp2_fewer_batches_than_ranks": (2, {"data_parallel": "fsdp"}, 4, 1),
    "fsdp2xtp2_uneven": (4, {"data_parallel": "fsdp", "tp": 2}, 3, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_validation_equals_one_process(dist_pool, case: str) -> None:
    world, parallel, num_batches, available = CASES[case]
    results = dist_pool(world).run("dist_cases_init:sharded_validation", parallel, num_batches, available)
    used = min(num_batches, available)
    dp = world // parallel.get("tp", 1)
    for r in results:
        got, want = r["got"], r["want"]
        assert got["val_batches"] == want["val_batches"] == used
        assert got["val_tokens"] == want["val_tokens"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6, abs=0)
        assert r["forwards"] == math.ceil(used / dp)  # 1/dp of the work (one stand-in when uneven)
    assert len({r["got"]["val_loss"] for r in results}) == 1  # every rank reports the same number
