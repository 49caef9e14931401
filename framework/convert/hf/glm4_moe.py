"""GLM-4.5 (Glm4MoeForCausalLM): Llama's layers with q/k/v biases (attention_bias; none on o_proj or any MLP:
Loom's bias_scope qkv), optional per-head QK-norm (use_qk_norm), RoPE over the first partial_rotary_factor of each
head (Loom's rope_fraction; only those rows are permuted into HF's half layout), and DeepSeek-V3 routing.

Routing (Glm4MoeTopkRouter): sigmoid scores; top-k on scores + e_score_correction_bias (Loom's router.expert_bias
buffer) among the best topk_group of n_group groups, a group scoring the sum of its two best; weights are the
chosen scores, renormalised (norm_topk_prob) and times routed_scaling_factor (Loom's route_scale). Every MoE
layer adds n_shared_experts ungated shared experts as one MLP of width n_shared_experts x moe_intermediate_size.
The first first_k_dense_replace layers are a dense MLP of width intermediate_size (Loom's moe.first_dense, every 1).

An import keeps the selection bias as a fixed buffer (moe.expert_bias, bias_update_rate 0) and sets no balancing
loss (Glm4MoeConfig has no coefficient).

Multi-token prediction (model.mtp): depth k is HF layer num_hidden_layers + k (framework/convert/hf/mtp.py), a
block named as any layer of that index (MoE, as every layer past first_k_dense_replace) plus enorm, hnorm, eh_proj
and shared_head.norm. An import takes the depths the weights hold (at most num_nextn_predict_layers; transformers'
save_pretrained writes none) and ignores their copies of the embedding and head; an export writes every depth,
with those copies (the Hub checkpoints' layout, which MTP-aware servers read), and num_nextn_predict_layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from framework.config.schema import ModelConfig, MoEConfig
from framework.convert.hf import experts, llama
from framework.convert.hf.mapping import Rename, copy, duplicate
from framework.convert.hf.mtp import (
    SHARED_COPIES,
    depth_in_state,
    mtp_config_fields,
    mtp_depth,
    mtp_hf_layers,
    mtp_renames,
)

Tensor = torch.Tensor
LAYER = llama.LAYER
EXPORTS_MTP = True
"""convert.export_state keeps model.mtp: the depths are written as layers after the stack."""
FILES = experts.FileLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
optional = llama.optional
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _zero_bias(n_experts: int) -> Callable[[list[Tensor]], Tensor]:
    """No Loom tensor: transformers always has the buffer, so a router without a selection bias writes zeros."""
    return lambda _: torch.zeros(n_experts)


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    """Layer i's dense MLP, or its router (with the selection bias), routed experts and shared experts."""
    if not cfg.is_moe_layer(i):
        return llama.feed_forward(cfg, i)
    assert cfg.moe is not None
    src, dst = f"layers.{i}.feed_forward.", LAYER.format(i=i) + "mlp."
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    shared = [copy(f"{src}shared_experts.{ours}.weight", f"{dst}shared_experts.{theirs}.weight")
              for ours, theirs in names.items()]  # fmt: skip
    bias = f"{dst}gate.e_score_correction_bias"
    if cfg.moe.has_expert_bias:
        selection = copy(f"{src}router.expert_bias", bias)
    else:
        selection = Rename((), bias, _zero_bias(cfg.moe.n_experts), lambda _: [], export_only=True)
    return experts.moe_renames(i, LAYER.format(i=i)) + shared + [selection]


def block(cfg: ModelConfig, i: int) -> list[Rename]:
    return llama.block(cfg, i, feed_forward)


def renames(cfg: ModelConfig) -> list[Rename]:
    """Llama's layout (q/k/v biases when cfg.bias, q_norm / k_norm when cfg.qk_norm) with GLM's MoE layers, then
    the MTP depths with their copies of the embedding and head (written, never read)."""
    head = "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"
    copies = [
        duplicate(loom, LAYER.format(i=i) + name)
        for i in mtp_hf_layers(cfg)
        for loom, name in zip(("tok_embeddings.weight", head), SHARED_COPIES, strict=True)
    ]
    return llama.renames(cfg, ffn=feed_forward) + mtp_renames(cfg, block) + copies


def to_files(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return experts.to_files(state, FILES)


def from_files(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Either expert layout -> the fused names; MTP layers past cfg's depths are dropped (as transformers drops
    them all)."""
    depth = cfg.mtp.depth if cfg.mtp is not None else 0
    kept = {k: v for k, v in state.items() if not _past_stack(k, cfg.n_layers + depth)}
    return experts.from_files(kept, FILES, cfg)


def _past_stack(name: str, n_layers: int) -> bool:
    match = _LAYER_INDEX.match(name)
    return match is not None and int(match[1]) >= n_layers


def _moe(hf: Any) -> MoEConfig:
    return MoEConfig(
        n_experts=hf.n_routed_experts,
        top_k=hf.num_experts_per_tok,
        expert_hidden=hf.moe_intermediate_size,
        n_shared_experts=hf.n_shared_experts,
        first_dense=hf.first_k_dense_replace,
        router="sigmoid",
        n_groups=hf.n_group,
        topk_groups=hf.topk_group,
        renormalize=bool(hf.norm_topk_prob),
        route_scale=float(hf.routed_scaling_factor),
        aux_loss=0.0,
        expert_bias=True,
    )


def state_fields(hf: Any, state: dict[str, Tensor]) -> dict[str, Any]:
    """model.mtp from the MTP layers the weights hold, up to the declared num_nextn_predict_layers."""
    held = depth_in_state(state, hf.num_hidden_layers)
    return {"mtp": None} | mtp_config_fields(hf, min(held, mtp_depth(hf)))


def model_config(hf: Any) -> dict[str, Any]:
    fields = llama.model_config(hf)  # bias = attention_bias (q/k/v only here)
    params = dict(getattr(hf, "rope_parameters", None) or {})
    # transformers 5 keeps it in rope_parameters (default 0.5); older config.json files at the top level
    fraction = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 0.5))
    return (
        fields
        | {
            "bias_scope": "qkv" if fields["bias"] else "all",
            "qk_norm": bool(hf.use_qk_norm),
            "rope_fraction": float(fraction),
            "moe": _moe(hf),
        }
        | mtp_config_fields(hf)
    )  # the declared depths; an import from weights keeps those present (state_fields)
