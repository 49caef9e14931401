"""The memory model's weight copies under FSDP2 (framework/models/memory.py: _weight_copies) against what a forward
through Loom's FSDP2 layout really keeps for backward (2 gloo ranks, bf16 autocast, CPU).

One process: autocast keeps a bf16 copy of every weight matrix until backward (tests/framework/models/test_memory.py
checks that estimate). FSDP2 over 2 ranks: its MixedPrecisionPolicy gathers the weights already in bf16 and frees a
block's after its forward, so no copy survives; the estimate charges the root's gathered weights and two blocks in
flight instead, and stays an upper bound (it also counts the residual stream in fp32 where FSDP2 casts the blocks'
inputs to bf16)."""

from __future__ import annotations


def test_fsdp2_keeps_no_weight_copies_and_the_estimate_bounds_it(dist_pool) -> None:
    for rank in dist_pool(2).run("dist_cases_memory:fsdp_forward_keeps"):
        fsdp, single = rank["fsdp"], rank["single"]
        assert single["weight_copies"] > 0  # the detector finds autocast's copies in one process...
        assert fsdp["weight_copies"] == 0  # ...and none under FSDP2
        estimate = sum(rank["fsdp_estimate"].values())
        assert fsdp["saved_bytes"] <= estimate <= 1.6 * fsdp["saved_bytes"], (fsdp, rank["fsdp_estimate"])
        # the layouts differ only in the weights: the estimate drops the copies, the measurement loses more
        one = rank["single_estimate"]
        assert rank["fsdp_estimate"]["weight_copies"] < one["weight_copies"]
        assert {k: v for k, v in rank["fsdp_estimate"].items() if k != "weight_copies"} == {
            k: v for k, v in one.items() if k != "weight_copies"
        }
        saved = single["saved_bytes"] - fsdp["saved_bytes"]
        assert saved >= one["weight_copies"] - rank["fsdp_estimate"]["weight_copies"]
