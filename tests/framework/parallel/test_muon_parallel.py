"""Muon (optim.name muon, framework/train/muon.py) trains like one process on every layout: the owner of each
sharded matrix gathers its full update, iterates Newton-Schulz and scatters the result back, so no rank
orthogonalises a shard.

Tolerances (the parity harness's): per-step loss and gradient norm <= 1e-5 relative, every parameter after 5 Muon
steps <= 1e-4 relative. Measured: <= 6.2e-7 on every layout (fp32 Newton-Schulz on CPU). A wrong update is far
outside that: broadcasting a tall matrix's transposed (non-contiguous) result, a bug fixed on the way, was 3e-2 off.
"""

from __future__ import annotations

from typing import Any

import pytest

from framework.config.schema import MoEConfig

STEPS = 5
GQA = {"kv_heads": 2, "mlp": "swiglu"}
# 4 experts: stacked [E, H, D] weights, orthogonalised per expert (EP shards the expert dimension)
MOE = {
    "mlp": "swiglu",
    "init_std": 0.08,
    "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16, z_loss=1e-3),
}
# QK-clip at a tau below the tiny model's init logits (~0.05), so heads are clipped on every step: the per-head maxima
# are max-reduced over data-parallel ranks (other samples), tensor-parallel ranks (other heads) and pipeline stages
# (other layers), and each case clips the same heads as one process on every step
CLIP = {"qk_clip": 0.02}
# name: (world, parallel, model, micro-batch, optim settings besides name muon)
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any] | None, int, dict[str, Any]]] = {
    "fsdp2_qk_clip": (2, {"data_parallel": "fsdp"}, GQA, 1, CLIP),
    "tp2_sp_qk_clip": (
        2,
        {"tp": 2, "sequence_parallel": True},
        GQA | {"bias": True, "bias_scope": "qkv"},
        1,
        CLIP,
    ),
    "ep2": (2, {"ep": 2}, MOE, 1, {}),
    "hsdp2x2": (4, {"data_parallel": "hsdp", "dp_replicate": 2}, None, 1, {}),
    "pp2_qk_clip": (2, {"pp": 2}, {"n_layers": 4}, 2, CLIP),
    "tp2xpp2xfsdp2": (8, {"tp": 2, "pp": 2, "data_parallel": "fsdp"}, GQA | {"n_layers": 4}, 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_muon_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model, micro_batch, optim = CASES[case]
    results = dist_pool(world).run(
        "dist_cases_muon:muon_parity", STEPS, parallel, model, micro_batch, 0, optim
    )
    for result in results:
        print(case, result)
        assert result["names_subset"] and result["moved"], result
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["param_rel"] <= 1e-4, result
        if optim:
            assert result["clipped"] == result["ref_clipped"] and min(result["clipped"]) > 0, result
    sharded = [r for r in results if r["sharded"]]
    if sharded:  # the work spreads: every rank owns some of the matrices, none owns all
        assert all(0 < r["owned"] < r["sharded"] for r in sharded), results
