"""Context parallelism (Ulysses all-to-all, framework/parallel/context.py) trains like one process (fp32, gloo), each
layout built the way `loom train` builds it (meta build, parallelize, sharded init; train_module_for).

Tolerances as tests/framework/parallel/test_tensor_parallel.py: per-step loss and gradient norm <= 1e-5 relative;
every parameter's gradient of the first step <= 1e-5 relative per tensor; a held-out batch's eval_batch loss sum
<= 1e-5 (every cp peer returns the whole batch's sums) with the same labelled-token count;
the same parameter names; parameters after 5 AdamW steps <= 1e-4 relative per tensor (the parity rule of
tests/framework/parallel; tiny_recipe's lr 1e-3). Gradients that are zero in
exact arithmetic (the key bias) are rounding noise: listed by the case, not compared.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from dist_cases import GLOBAL_BATCH, tiny_recipe
from dist_cases_cp import assert_matches
from test_tensor_parallel import ALIBI, BERT, GEMMA2, GQA, MOE

from framework.config import ConfigError
from framework.config.schema import MoEConfig
from framework.parallel.dims import ParallelDims

# T5-style bucketed relative bias on a decoder, with GQA: the bias is computed for the whole sequence and each cp
# rank keeps its heads' block of it
RELATIVE = {"position": "relative_bias", "relative_buckets": 8, "relative_max_distance": 16, "kv_heads": 2}
# ALiBi slopes by global head (tp offset + cp offset), learned temperature and soft distance weights narrowed to
# this rank's heads, distances from the gathered positions, a sliding window
ALIBI_WINDOW = ALIBI | {"sliding_window": 6}
CP2, CP2_SP = {"cp": 2}, {"cp": 2, "tp": 2, "sequence_parallel": True}
MOE_GLOBAL = MOE | {"moe": replace(MOE["moe"], aux_loss_scope="global_batch", bias_update_rate=1e-2)}
MOE_SEQUENCE = MOE | {"moe": replace(MOE["moe"], aux_loss_scope="sequence", router="sigmoid")}

STEPS = 5
# name: (world, parallel, model, batch kind, z-loss)
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any], str, float]] = {
    # RoPE on global positions (restarting at each document), document mask across the shard boundary
    "cp2_gqa_documents": (2, CP2, GQA, "documents", 1e-3),
    # prefix-LM: the prefix of a sample reaches into the other shard
    "cp2_alibi_window_prefix": (2, CP2, ALIBI_WINDOW, "prefix", 0.0),
    # one head per rank: tp's block of heads split again over cp; the residual stream on S/(cp x tp) tokens
    "cp2xtp2_sp_alibi_documents": (4, CP2_SP, ALIBI_WINDOW, "documents", 1e-3),
    # FSDP2 over the flattened (dp_shard, cp) mesh; dp ranks read different samples
    "cp2xfsdp2_relative_documents": (4, CP2 | {"data_parallel": "fsdp"}, RELATIVE, "documents", 0.0),
    # bidirectional masked LM: learned positions and token types on the shard, full attention
    "encoder_cp2": (2, CP2, BERT, "mlm", 0.0),
    # router losses over the global batch (counts and token totals summed over cp) + aux-loss-free bias updates
    "cp2_moe_global_batch": (2, CP2, MOE_GLOBAL, "documents", 0.0),
    # per-micro-batch and per-sequence router statistics: choice counts and tokens summed over the cp shards
    "cp2_moe_micro_batch": (2, CP2, MOE, "documents", 0.0),
    "cp2xfsdp2_moe_sequence": (4, CP2 | {"data_parallel": "fsdp"}, MOE_SEQUENCE, "documents", 0.0),
    # Gemma 2: soft-capped scores on the gathered sequence, a windowed and a full-attention block, documents
    "cp2_gemma2_documents": (2, CP2, GEMMA2, "documents", 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model, kind, z_loss = CASES[case]
    results = dist_pool(world).run("dist_cases_cp:parity", STEPS, parallel, model, kind, z_loss)
    dp = world // (parallel["cp"] * parallel.get("tp", 1))
    for result in results:
        print(case, result)
        assert_matches(result)
        assert all(n.endswith("attention.wk.bias") for n in result["noise_grads"]), result
        # every attention exchanged sequence shards, on this rank's share of the tokens
        assert result["hooked_attention"] == 2, result
        assert result["tokens_share"] == pytest.approx(1 / (dp * parallel["cp"])), result


# -- layout rules, in process (no process group) -------------------------------------------------------------


def _dims(world: int, model: dict[str, Any] | None = None, **parallel: Any) -> ParallelDims:
    return ParallelDims.from_recipe(tiny_recipe(model, **parallel), world)


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_cp_accepted_for_decoder_and_encoder(family: str) -> None:
    dims = _dims(4, {"family": family, "position": "learned"}, cp=2)
    assert (dims.cp, dims.dp_shard, dims.dp) == (2, 2, 2)
    assert "cp 2" in dims.describe()
    # every cp peer reads the same data-parallel slice: the batch rule counts dp ranks only
    assert GLOBAL_BATCH % dims.dp == 0


@pytest.mark.parametrize(
    ("world", "model", "parallel", "key", "rule"),
    [
        (2, {"family": "encoder_decoder"}, CP2, "parallel.cp", "does not support cp"),
        (
            2,
            {"n_heads": 2, "kv_heads": 1},
            CP2,
            "model.kv_heads",
            "divisible by parallel.cp x parallel.tp = 2",
        ),
        (4, {"n_heads": 2}, {"cp": 2, "tp": 2}, "model.n_heads", "cp x parallel.tp = 4"),
        (4, {"kv_heads": 2}, {"cp": 2, "tp": 2}, "model.kv_heads", "cp x parallel.tp = 4"),
        (
            2,
            {"moe": MoEConfig(n_experts=4, top_k=2, aux_loss_scope="sequence", capacity_factor=1.0)},
            CP2,
            "model.moe.capacity_factor",
            "token dropping with parallel.cp > 1",
        ),
    ],
)
def test_cp_rules(world: int, model: dict, parallel: dict, key: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule) as err:
        _dims(world, model, **parallel)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("parallel", "seq_len", "rule"), [(CP2, 15, "cp=2$"), (CP2_SP, 18, "sequence parallel")]
)
def test_cp_sequence_must_split_evenly(parallel: dict, seq_len: int, rule: str) -> None:
    recipe = tiny_recipe(None, **parallel)
    recipe.data.seq_len = seq_len
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_recipe(recipe, 2 * parallel.get("tp", 1))
    assert err.value.key == "data.seq_len"
    assert re.search(rule, err.value.rule), err.value
