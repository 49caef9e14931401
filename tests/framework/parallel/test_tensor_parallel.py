"""Tensor parallelism (+ sequence parallel, vocab-parallel embedding and head with loss parallel, T5 relative bias,
MoE, encoder and encoder-decoder families) trains like one process (fp32, gloo), each layout initialised by itself
from the seed.

Tolerances: per-step loss and gradient norm <= 1e-5 relative (as test_parity.py); every parameter's gradient of
the first step <= 1e-5 relative per tensor (stricter than a norm: the direct evidence); a held-out batch's
eval_batch loss sum <= 1e-5; the same parameter names; parameters after 5 AdamW steps <= 1e-4 relative per tensor
(the issue's bound; test_parity.py's 5e-5 is exceeded by the sequence-parallel GQA and T5 cases, 5.9e-5 and
6.7e-5, while their first-step gradients agree to 6.8e-7: Adam's first steps are nearly lr * sign(gradient) at
lr 1e-2 on 0.02-std weights, so entries with near-zero gradients turn last-bit differences into whole steps).
Gradients that are zero in exact arithmetic (the key bias: softmax ignores a shift shared by all keys) are rounding
noise in both runs; they are listed by the case, checked to be exactly those, and not compared.
"""

from __future__ import annotations

from typing import Any

import pytest
from dist_cases import tiny_recipe

from framework.config import ConfigError
from framework.config.schema import MoEConfig
from framework.parallel.dims import ParallelDims
from framework.parallel.tensor import loss_context, vocab_parallel

STEPS = 5
"""Optimizer steps each layout trains and is compared with one process for (the issue's parity rule)."""

GQA = {"kv_heads": 2, "mlp": "swiglu", "position": "rope", "qk_norm": True}  # Llama GQA + Qwen3's QK-norm
ALIBI = {"position": "alibi", "mlp": "gelu", "learned_temperature": True, "soft_distance_bias": True}
# recipes/bert-base.yaml, shrunk: post-norm LayerNorm, biases, learned positions, token types, embed_norm,
# MLM head transform, output bias
BERT = {
    "family": "encoder",
    "mlp": "gelu",
    "gelu_approximate": "none",
    "norm": "layernorm",
    "norm_position": "post",
    "bias": True,
    "position": "learned",
    "type_vocab_size": 2,
    "embedding_norm": True,
    "mlm_head_transform": True,
    "output_bias": True,
}
# recipes/t5-base.yaml, shrunk: gated GELU, RMSNorm, no biases, relative buckets, unscaled attention
T5 = {
    "family": "encoder_decoder",
    "n_decoder_layers": 2,
    "mlp": "geglu",
    "gelu_approximate": "tanh",
    "norm": "rmsnorm",
    "bias": False,
    "position": "relative_bias",
    "relative_buckets": 8,
    "relative_max_distance": 16,
    "softmax_scale": "none",
}
# tests/test_demo_moe.py's router (softmax top-2, aux + router z-loss), 4 small experts, a dense first layer
MOE = {"mlp": "swiglu", "moe": MoEConfig(n_experts=4, top_k=2, expert_hidden=16, first_dense=1, z_loss=1e-3)}
# Gemma 2: sandwich norms (the post-branch norms run on sequence shards too), (1 + w) norms, soft caps, a
# windowed and a full-attention block
GEMMA2 = {"mlp": "geglu", "gelu_approximate": "tanh", "kv_heads": 2, "norm_weight_offset": True,
          "sandwich_norm": True, "embedding_scale": "sqrt_d_model", "final_logit_softcap": 3.0,
          "attention_softcap": 2.0, "tie_embeddings": True, "sliding_window": 5,
          "full_attention_layers": [1]}  # fmt: skip
TP2, SP = {"tp": 2}, {"tp": 2, "sequence_parallel": True}

# name: (world, parallel, model, batch kind, z-loss)
CASES: dict[str, tuple[int, dict[str, Any], dict[str, Any], str, float]] = {
    # SP with an untied head (the MHA case of SP is tp2_sp_tied's, the untied head's without SP tp2_untied's)
    "tp2_sp_gqa": (2, SP, GQA, "causal", 1e-3),
    # Qwen2: biases on the sharded q/k/v columns only, none on the row-parallel wo or the MLP
    "tp2_sp_qkv_bias": (2, SP, {"kv_heads": 2, "bias": True, "bias_scope": "qkv"}, "causal", 0.0),
    "tp2_sp_alibi": (2, SP, ALIBI, "causal", 0.0),
    "tp2_untied": (2, TP2, {}, "causal", 1e-3),
    "tp2_tied": (2, TP2, {"tie_embeddings": True}, "causal", 1e-3),
    "tp2_sp_tied": (2, SP, {"tie_embeddings": True}, "causal", 0.0),
    "tp2_bert_tied": (2, TP2, BERT | {"tie_embeddings": True}, "mlm", 0.0),
    "tp2_sp_bert_untied": (2, SP, BERT, "mlm", 0.0),
    # post-norm without a head transform: the last block feeds the tied head
    "tp2_sp_encoder_tied": (2, SP, BERT | {"tie_embeddings": True, "mlm_head_transform": False}, "mlm", 0.0),
    # T5 v1.0 ties its head: the decoder stack feeds it
    "tp2_sp_t5_tied": (2, SP, T5 | {"tie_embeddings": True}, "seq2seq", 0.0),
    "tp2_moe": (2, TP2, MOE, "causal", 0.0),
    "tp2_sp_moe": (2, SP, MOE, "causal", 0.0),
    "fsdp2xtp2_sp_gqa": (4, SP | {"data_parallel": "fsdp"}, GQA, "causal", 1e-3),
    "tp2_sp_gemma2": (2, SP, GEMMA2, "causal", 0.0),
    "tp2_gemma2_untied": (2, TP2, GEMMA2 | {"tie_embeddings": False}, "causal", 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_matches_one_process(dist_pool, case: str) -> None:
    world, parallel, model, kind, z_loss = CASES[case]
    results = dist_pool(world).run("dist_cases_tp:parity", STEPS, parallel, model, kind, z_loss)
    for result in results:
        print(case, result)
        assert result["names_equal"]
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["grad_rel"] <= 1e-5, result
        assert result["eval_rel"] <= 1e-5, result
        assert not result["params_beyond_tolerance"], result
        assert all(n.endswith("attention.wk.bias") for n in result["noise_grads"]), result
        # tied or not, the head's logits stay sharded over the vocabulary (loss parallel), as do the embeddings'
        # rows (under FSDP2 also over dp_shard)
        assert result["logits"] == "(Shard(dim=2),)", result
        assert "Shard(dim=0)" in result["embedding"], result
        assert result["embedding_grad"] == "sharded like the weight", result


def test_fused_adamw_under_tp_without_fsdp(dist_pool) -> None:
    """optim.fused (the CUDA default) under TP alone: norms and embeddings stay plain tensors while projections
    are DTensors, which one fused launch refuses ("_fused_adamw_ got mixed torch.Tensor and DTensor"); the
    optimizer keeps one group per layout, and the run matches one process taking the same fused AdamW."""
    results = dist_pool(2).run("dist_cases_tp:parity", STEPS, TP2, GQA, "causal", 0.0, True)
    for result in results:
        assert max(result["loss_rel"]) <= 1e-5, result
        assert not result["params_beyond_tolerance"], result


PIPELINES = {
    # 4 one-block stages, two per rank, documents as a keyword input: every stage starts and ends replicated and
    # the single block of a stage both slices and gathers
    "pp2xtp2_sp_interleaved": ("interleaved_1f1b", ALIBI, 4),
    # a tied head on the last stage: its copy of the vocab-sharded weight gets a gradient of the same shards as
    # the first stage's embedding (the pipeline engine sums the two)
    "pp2xtp2_sp_tied": ("1f1b", {"tie_embeddings": True}, 2),
}


@pytest.mark.parametrize("case", list(PIPELINES))
def test_sequence_parallel_inside_pipeline_stages(dist_pool, case: str) -> None:
    """TP2+SP x PP2 (dist_cases_pp.pp_parity, the pipeline engine) against one process."""
    schedule, model, micro_batch = PIPELINES[case]
    parallel = {"pp": 2, "tp": 2, "sequence_parallel": True, "pp_schedule": schedule}
    results = dist_pool(4).run("dist_cases_pp:pp_parity", STEPS, parallel, model, micro_batch, True)
    for result in results:
        print(case, {k: v for k, v in result.items() if k != "names"})
        assert result["names_subset"] and result["eval_tokens_equal"]
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["eval_rel"] <= 1e-5, result
        assert result["param_rel"] <= 1e-4, result


# -- layout rules, in process (no process group) -------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_vocabulary_must_split_evenly_over_tp(tied: bool) -> None:
    """The vocab-parallel embedding and head take equal blocks of rows: a ConfigError before any process starts."""
    recipe = tiny_recipe({"vocab_size": 63, "tie_embeddings": tied}, tp=2)
    with pytest.raises(ConfigError, match="model.vocab_size.*divisible by parallel.tp=2") as err:
        ParallelDims.from_recipe(recipe, 2)
    assert err.value.key == "model.vocab_size" and "pad the vocabulary" in str(err.value)
    recipe.model.vocab_size = 64
    dims = ParallelDims.from_recipe(recipe, 2)
    assert vocab_parallel(dims, recipe)
    assert type(loss_context(dims, recipe)).__name__ != "nullcontext"  # loss_parallel


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_sequence_parallel_accepted_for_every_family(family: str) -> None:
    recipe = tiny_recipe({"family": family, "position": "learned"}, tp=2, sequence_parallel=True)
    assert ParallelDims.from_recipe(recipe, 2).sequence_parallel
    recipe.data.seq_len = 15
    with pytest.raises(ConfigError, match="data.seq_len.*sequence parallel"):
        ParallelDims.from_recipe(recipe, 2)


def test_qk_norm_over_the_whole_projection_refuses_tp() -> None:
    """OLMo 2's QK-norm takes one statistic over every head; tp splits the projections by heads."""
    recipe = tiny_recipe({"norm_position": "reordered", "qk_norm": True, "qk_norm_scope": "projection"}, tp=2)
    with pytest.raises(ConfigError, match="model.qk_norm_scope.*parallel.tp=2"):
        ParallelDims.from_recipe(recipe, 2)
    recipe.parallel.tp = 1
    ParallelDims.from_recipe(recipe, 1)
