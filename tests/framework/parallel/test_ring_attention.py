"""Ring attention and hybrid (Ulysses x ring) context parallelism (framework/parallel/ring.py) train like one
process (fp32, gloo), built the way `loom train` builds it.

The harness and tolerances are tests/framework/parallel/test_context_parallel.py's: per-step loss and gradient
norm <= 1e-5 relative, first-step gradients <= 1e-5 per tensor, a held-out batch's loss <= 1e-5, parameters
after 5 AdamW steps <= 1e-4 per tensor. Every case packs documents (a new one at ~1 in 4 tokens, so blocks with
and without shared documents both occur) or uses a prefix-LM prefix.
"""

from __future__ import annotations

from typing import Any

import pytest
from dist_cases_cp import assert_matches
from test_context_parallel import ALIBI_WINDOW, RELATIVE
from test_tensor_parallel import GEMMA2

from framework.config.schema import LayersConfig

GQA = {"kv_heads": 2}
MQA = {"kv_heads": 1}  # Ulysses cannot split one KV head over cp ranks; the ring does not need to
LOCAL_GLOBAL = {"layers": LayersConfig(pattern=["attention_local", "attention"], local_window=5)}

STEPS = 5
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any], str]] = {
    "ring2_documents": (2, {"cp": 2, "cp_ring": 2}, GQA, "documents"),
    "ring2_unbalanced": (2, {"cp": 2, "cp_ring": 2, "cp_load_balance": False}, GQA, "documents"),
    "ring4_mqa_window": (4, {"cp": 4, "cp_ring": 4}, MQA | LOCAL_GLOBAL, "documents"),
    "ring2_prefix_lm": (2, {"cp": 2, "cp_ring": 2}, {}, "prefix"),
    # plain causal: blocks as mask-free pieces of the zigzag chunks (rank 1's chunks 1 and 2 are one run)
    "ring2_plain_causal": (2, {"cp": 2, "cp_ring": 2}, GQA, "plain"),
    "hybrid2x2_gqa": (4, {"cp": 4, "cp_ring": 2}, GQA, "documents"),
    # 8 processes: heads over tp 2 x ulysses 2, the ring across, FSDP2 over (dp_shard, cp), sequence parallel
    "hybrid2x2_tp2_sp_fsdp": (
        8,
        {"cp": 4, "cp_ring": 2, "tp": 2, "sequence_parallel": True, "data_parallel": "fsdp"},
        {"n_heads": 8, "kv_heads": 4},
        "documents",
    ),  # fmt: skip
    # score terms in the blocks, each with its gradient: ALiBi slopes by global head, learned temperatures and
    # soft distance weights on global positions, a window, the prefix reaching across ring ranks
    "ring2_alibi_soft_prefix": (2, {"cp": 2, "cp_ring": 2}, ALIBI_WINDOW, "prefix"),
    # the T5 table over the whole sequence in natural order, narrowed to the Ulysses rank's heads
    "hybrid2x2_relative": (4, {"cp": 4, "cp_ring": 2}, RELATIVE, "documents"),
    # Gemma 2's soft-capped scores and gpt-oss's sinks (merged as one more block with no value)
    "ring2_softcap_sinks": (2, {"cp": 2, "cp_ring": 2}, GEMMA2 | {"attention_sinks": True}, "documents"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model, kind = CASES[case]
    for result in dist_pool(world).run("dist_cases_cp:parity", STEPS, parallel, model, kind):
        print(case, result)
        assert result["hooks"] == ["ring_attend"] and result["tokens_share"] == 1 / parallel["cp"], result
        assert_matches(result)


def test_zigzag_balances_causal_work() -> None:
    """Causal (query, key) pairs each ring rank computes, counted from the sharding itself: contiguous chunks give
    rank r (2r + 1) / cp_ring^2 of the pairs (the last rank 2 cp_ring - 1 times the first's); zigzag gives every
    rank the same share."""
    import torch

    from framework.parallel.ring import ring_tokens, token_order

    seq, ring = 64, 4

    def pairs(balanced: bool) -> list[int]:
        order = token_order(seq, ring, 1, balanced=balanced)
        allowed = [ring_tokens(order, ring, r) for r in range(ring)]
        return [int((q[:, None] >= torch.arange(seq)[None]).sum()) for q in allowed]

    contiguous, zigzag = pairs(False), pairs(True)
    assert sum(contiguous) == sum(zigzag) == seq * (seq + 1) // 2
    assert contiguous[-1] / contiguous[0] > 2 * ring - 2 and len(set(zigzag)) == 1
    print(f"causal pairs per ring rank: contiguous {contiguous}, zigzag {zigzag}")


def test_ring_activation_memory_falls_as_one_over_cp(dist_pool) -> None:
    """Sequence 16k on 4 ranks (ring cp4, tiny model): what a rank's forward keeps for backward, measured with the
    saved-tensor accounting of the memory tests, is 1/4 of what one process keeps (within 15%), and the estimate
    of framework/models/memory.py is the measurement (to 8 bytes: the loss's scalars)."""
    results = dist_pool(4).run("dist_cases_memory:ring_forward_keeps", 16384)
    single = results[0]["single"]
    assert abs(results[0]["single_estimate"] - single) <= 8, results[0]
    for rank, r in enumerate(results):
        print(rank, r, f"one process / rank: {single / r['ring']:.3f}")
        assert abs(single / r["ring"] / 4 - 1) <= 0.15, r
        assert abs(r["ring_estimate"] - r["ring"]) <= 8, r


def test_te_kernels_run_te_ring_on_the_zigzag_shard(dist_pool) -> None:
    """model.kernels te with a ring: every attention layer's TE kernel gets TE's p2p context parallelism over
    the ring's ranks and this rank's shard (S / cp tokens) unchanged; Loom's own ring does not run."""
    for result in dist_pool(2).run("dist_cases_cp:te_ring_wiring"):
        assert result["calls"], result
        for call in result["calls"]:
            assert call == {"comm_type": "p2p", "ranks": [0, 1], "q_len": result["seq"] // 2, "group_size": 2}
