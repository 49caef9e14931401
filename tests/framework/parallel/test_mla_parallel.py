"""Multi-head Latent Attention (model.layers.pattern [mla]) trains like one process on every parallel layout
(fp32, gloo), built the way `loom train` builds it.

The harness and tolerances are tests/framework/parallel/test_context_parallel.py's: per-step loss and gradient
norm <= 1e-5 relative, first-step gradients <= 1e-5 per tensor, a held-out batch's loss <= 1e-5, parameters
after 5 AdamW steps <= 1e-4 per tensor. Packed documents in every case (document masking inside MLA's attention).
The 8-process MLA + MoE + MTP layout is in test_expert_parallel.py (its routing-margin harness).
"""

from __future__ import annotations

from typing import Any

import pytest
from dist_cases_cp import assert_matches

from framework.config.schema import LayersConfig, MLAConfig

# odd widths throughout: 4 heads, kv latent 12, q latent 10, nope 6 / rope 4 / v 5 per head
MLA = {
    "layers": LayersConfig(pattern=["mla"]),
    "mla": MLAConfig(kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
}
MLA_NO_Q_LORA = MLA | {
    "mla": MLAConfig(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
}

STEPS = 5
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}, MLA),
    "tp2_no_q_lora": (2, {"tp": 2}, MLA_NO_Q_LORA),
    "cp2": (2, {"cp": 2}, MLA),  # Ulysses: the expanded per-head q, k, v exchanged for heads
    "fsdp2": (2, {"data_parallel": "fsdp"}, MLA),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mla_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model = CASES[case]
    for result in dist_pool(world).run("dist_cases_cp:parity", STEPS, parallel, model, "documents", 0.0):
        print(case, result)
        assert_matches(result)
