"""Meta-device build before sharding: build on meta -> parallelize -> to_empty -> each rank initialises its shards
from (seed, parameter name). The whole weights equal the one-process `materialize_model` weights bitwise, under the
same names, and training from them matches one process (the parity tolerances of test_parity.py)."""

from __future__ import annotations

import pytest

GQA = {"kv_heads": 2, "mlp": "swiglu", "position": "rope", "qk_norm": True}
# learned per-head temperature and distance weights: per-head parameters sharded over tp
ALIBI = {"position": "alibi", "mlp": "gelu", "learned_temperature": True, "soft_distance_bias": True}
# an odd vocabulary: FSDP2 shards the embedding and head unevenly (33 + 32 rows)
ODD_VOCAB = {"vocab_size": 65, "bias": True}
MOE = {"moe": {"n_experts": 4, "top_k": 2, "bias_update_rate": 0.01}}  # stacked experts + expert_bias buffer
# T5: the relative-bias table sharded by heads over tp
T5 = {"family": "encoder_decoder", "n_decoder_layers": 2, "mlp": "geglu", "position": "relative_bias"}
# BERT-like encoder, untied: vocab-parallel embedding, column-parallel head and its output bias
BERT = {"family": "encoder", "norm": "layernorm", "bias": True, "position": "learned", "output_bias": True}

LAYOUTS = {
    "ddp2": (2, {"data_parallel": "ddp"}, ODD_VOCAB),
    "fsdp2_odd_vocab": (2, {"data_parallel": "fsdp"}, ODD_VOCAB),
    "fsdp2_moe": (2, {"data_parallel": "fsdp"}, MOE),
    "tp2_gqa": (2, {"tp": 2}, GQA),
    "tp2_alibi": (2, {"tp": 2}, ALIBI),
    "fsdp2xtp2_gqa": (4, {"tp": 2, "data_parallel": "fsdp"}, GQA),
    "fsdp2xtp2_alibi": (4, {"tp": 2, "data_parallel": "fsdp"}, ALIBI),
    "tp2_sp_t5": (2, {"tp": 2, "sequence_parallel": True}, T5),
    "fsdp2xtp2_bert": (4, {"tp": 2, "data_parallel": "fsdp"}, BERT),
    "tp2_moe": (2, {"tp": 2}, MOE),
}
# pipeline ranks delete what they do not own: each initialises the names it holds, the ranks together all of them
PP_LAYOUTS = {
    "pp2_1f1b": (2, {"pp": 2}, {"n_layers": 4}),
    "pp2xfsdp2_interleaved": (
        4,
        {"pp": 2, "data_parallel": "fsdp", "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2},
        {"n_layers": 4},
    ),
}


def _model(overrides: dict) -> dict:
    if "moe" not in overrides:
        return overrides
    from framework.config.schema import MoEConfig

    return {**overrides, "moe": MoEConfig(**overrides["moe"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_equals_one_process_bitwise(dist_pool, layout: str) -> None:
    world, parallel, model = LAYOUTS[layout]
    for rank, result in enumerate(
        dist_pool(world).run("dist_cases_init:init_vs_one_process", parallel, _model(model))
    ):
        assert result["names_equal"], result["names"]
        assert result["unequal"] == [], (rank, result["unequal"])
        if parallel.get("data_parallel") != "ddp":
            # Really sharded: each rank holds a part of the model, not all of it.
            assert result["dtensors"] > 0 and result["local_numel"] < result["full_numel"], result
    if "moe" in model:
        assert any(b.endswith("expert_bias") for b in result["buffers"])


@pytest.mark.parametrize("layout", ["ddp2", "fsdp2_odd_vocab", "tp2_alibi", "fsdp2xtp2_gqa"])
def test_training_from_sharded_init_matches_one_process(dist_pool, layout: str) -> None:
    world, parallel, model = LAYOUTS[layout]
    for result in dist_pool(world).run("dist_cases_init:parity_meta_built", 3, parallel, _model(model)):
        assert result["names_equal"]
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["param_rel"] <= 5e-5, result
        print(layout, result)


@pytest.mark.parametrize("layout", list(PP_LAYOUTS))
def test_pipeline_ranks_initialise_what_they_hold_bitwise(dist_pool, layout: str) -> None:
    world, parallel, model = PP_LAYOUTS[layout]
    results = dist_pool(world).run("dist_cases_init:init_vs_one_process", parallel, model)
    for rank, result in enumerate(results):
        assert result["names_in_order"] and result["unequal"] == [], (rank, result)
        assert len(result["names"]) < len(result["all_names"])  # really a part of the model
    assert set().union(*(r["names"] for r in results)) == set(results[0]["all_names"])
