"""Hybrid models (recurrent mixers beside attention, model.layers.pattern) train like one process on every parallel
layout (fp32, gloo), built the way `loom train` builds them.

The harness and tolerances are tests/framework/parallel/test_context_parallel.py's: per-step loss and gradient
norm <= 1e-5 relative, first-step gradients <= 1e-5 per tensor, a held-out batch's loss <= 1e-5, parameters
after 5 AdamW steps <= 1e-4 per tensor. Packed documents in every case: the recurrent state and the conv reset at
each document start, also where a document crosses a context-parallel shard boundary (state passing, halo).
"""

from __future__ import annotations

from typing import Any

import pytest
from dist_cases import tiny_recipe
from dist_cases_cp import assert_matches

from framework.config import ConfigError
from framework.config.schema import GDNConfig, LayersConfig, Mamba2Config, MoEConfig
from framework.parallel.dims import ParallelDims

GDN = GDNConfig(heads=4, key_heads=2, key_head_dim=8, value_head_dim=6, chunk_size=4)
MAMBA = Mamba2Config(heads=4, head_dim=6, state_dim=8, groups=2, chunk_size=4)
# Qwen3-Next's shape in two blocks: a Gated DeltaNet block, a gated full-attention block with partial rotary
GDN_HYBRID = {"layers": LayersConfig(pattern=["gdn", "attention"]), "gdn": GDN, "kv_heads": 2,
              "attention_gate": True, "rope_fraction": 0.5}  # fmt: skip
GDN_MOE = GDN_HYBRID | {"moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16, z_loss=1e-3)}
MAMBA_HYBRID = {"layers": LayersConfig(pattern=["mamba2", "attention"]), "mamba2": MAMBA, "kv_heads": 2}
# Gemma 3's local/global interleave: a local block (own window and RoPE theta) and a global one
LOCAL_GLOBAL = {"layers": LayersConfig(pattern=["attention_local", "attention"], local_window=5,
                                       local_rope_theta=100.0), "kv_heads": 2}  # fmt: skip

STEPS = 5
# name: (world, parallel, model). GDN under FSDP2 and PP is in the 8-process PP_CASES below.
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "hsdp2x2_mamba2": (4, {"data_parallel": "hsdp", "dp_replicate": 2}, MAMBA_HYBRID),
    "tp2_sp_gdn": (2, {"tp": 2, "sequence_parallel": True}, GDN_HYBRID),
    "tp2_mamba2": (2, {"tp": 2}, MAMBA_HYBRID),
    "cp2_gdn": (2, {"cp": 2}, GDN_HYBRID),
    "cp2_mamba2": (2, {"cp": 2}, MAMBA_HYBRID),
    "cp2_local_global": (2, {"cp": 2}, LOCAL_GLOBAL),
    # EP over dp_shard x cp for the hybrid's MoE layers, with state passing in the same model
    "cp2xep2_gdn_moe": (2, {"cp": 2, "ep": 2}, GDN_MOE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model = CASES[case]
    for result in dist_pool(world).run("dist_cases_cp:parity", STEPS, parallel, model, "documents", 0.0):
        print(case, result)
        assert_matches(result)


# pipeline layouts (dist_cases_pp's harness: 4 blocks, micro-batches of 2, two documents per sample), the
# pattern repeated over the 4 blocks so each stage holds a recurrent and an attention block
PP_CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "pp2xfsdp2_mamba2": (4, {"pp": 2, "data_parallel": "fsdp"}, MAMBA_HYBRID),
    # the 8-process layouts: a hybrid MoE model (gdn + gated attention + MoE) on TP2 x PP2 x FSDP2, and
    # on TP2 x PP2 x CP2 (state passing and Ulysses in one model, inside pipeline stages)
    "tp2xpp2xfsdp2_gdn_moe": (8, {"tp": 2, "pp": 2, "data_parallel": "fsdp"}, GDN_MOE),
    "tp2xpp2xcp2_gdn_moe": (8, {"tp": 2, "pp": 2, "cp": 2}, GDN_MOE | {"kv_heads": 4}),
}


@pytest.mark.parametrize("case", list(PP_CASES))
def test_hybrid_pipeline_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model = PP_CASES[case]
    for result in dist_pool(world).run("dist_cases_pp:pp_parity", STEPS, parallel, model, 2, True):
        print(case, result)
        assert result["names_subset"]
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["param_rel"] <= 1e-4, result
        assert result["eval_rel"] <= 1e-5 and result["eval_tokens_equal"], result


@pytest.mark.parametrize(
    ("model", "parallel", "world", "key"),
    [
        (GDN_HYBRID | {"gdn": GDNConfig(heads=6, key_heads=3)}, {"tp": 2}, 2, "model.gdn.key_heads"),
        (MAMBA_HYBRID | {"mamba2": Mamba2Config(heads=4, groups=1)}, {"tp": 2}, 2, "model.mamba2.groups"),
    ],
)
def test_recurrent_tp_rules(model: dict, parallel: dict, world: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_recipe(tiny_recipe(model, **parallel), world)
    assert err.value.key == key


def test_cp_splits_only_attention_heads() -> None:
    """Ulysses splits attention heads over cp; a recurrent mixer passes state, so its heads need not divide."""
    model = GDN_HYBRID | {"gdn": GDNConfig(heads=3, key_heads=3, key_head_dim=8, value_head_dim=8)}
    assert ParallelDims.from_recipe(tiny_recipe(model, cp=2), 2).cp == 2
