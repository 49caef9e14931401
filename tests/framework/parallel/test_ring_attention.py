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
    "hybrid2x2_gqa": (4, {"cp": 4, "cp_ring": 2}, GQA, "documents"),
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
