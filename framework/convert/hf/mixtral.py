"""Mixtral (MixtralForCausalLM): Mistral's attention with every feed-forward a top-k softmax MoE of SwiGLU
experts, whose top-k weights transformers always renormalises (no norm_topk_prob switch).

Files name the block `block_sparse_moe` and an expert's gate/down/up projections w1/w2/w3 (Loom's own names).
"""

from __future__ import annotations

from typing import Any

from framework.config.schema import ModelConfig, MoEConfig
from framework.convert.hf import experts, llama
from framework.convert.hf.mapping import Rename

FILES = experts.FileLayout(block="block_sparse_moe", gate="w1", up="w3", down="w2")
optional = llama.optional


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    """The MoE of an MoE block, the dense MLP otherwise (Qwen3-MoE's mlp_only_layers; Mixtral has none)."""
    if cfg.is_moe_layer(i):
        return experts.moe_renames(i, llama.LAYER.format(i=i))
    return llama.feed_forward(cfg, i)


def renames(cfg: ModelConfig) -> list[Rename]:
    return llama.renames(cfg, ffn=feed_forward)


def to_files(cfg: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    return experts.to_files(state, FILES)


def from_files(cfg: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    return experts.from_files(state, FILES, cfg)


def model_config(hf: Any) -> dict[str, Any]:
    moe = MoEConfig(
        n_experts=hf.num_local_experts,
        top_k=hf.num_experts_per_tok,
        expert_hidden=hf.intermediate_size,  # explicit, as the recipes write it
        renormalize=True,
        aux_loss=float(hf.router_aux_loss_coef),
        jitter=float(hf.router_jitter_noise),
    )
    return llama.model_config(hf) | {"sliding_window": hf.sliding_window, "moe": moe}
