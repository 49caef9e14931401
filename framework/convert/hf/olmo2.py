"""OLMo 2 (Olmo2ForCausalLM) and OLMo 3 (Olmo3ForCausalLM): Llama's weights with the norms reordered and QK-norm
over the whole projections.

Each block computes x + norm(f(x)) (Loom's norm_position reordered): HF's post_attention_layernorm and
post_feedforward_layernorm are Loom's attention_norm and ffn_norm, applied to the branch outputs; there is no
input_layernorm. q_norm and k_norm normalise all n_heads x head_dim (kv_heads x head_dim) channels at once
(qk_norm_scope projection), before RoPE, so their gains follow the q/k rows' RoPE permutation head by head.
OLMo 3 adds transformers' per-layer `layer_types` (sliding windows on some layers): Loom's sliding_window plus
full_attention_layers, as for Gemma 2.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from framework.config.schema import ModelConfig
from framework.convert.hf import llama
from framework.convert.hf.gemma2 import _windows
from framework.convert.hf.mapping import Rename, copy, rope

optional = llama.optional


def renames(cfg: ModelConfig) -> list[Rename]:
    keep = (".attention_norm.weight", ".ffn_norm.weight", ".q_norm.weight", ".k_norm.weight")
    out = [r for r in llama.renames(cfg) if not r.loom[0].endswith(keep)]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", llama.LAYER.format(i=i)
        out += [
            copy(f"{src}attention_norm.weight", f"{dst}post_attention_layernorm.weight"),
            copy(f"{src}ffn_norm.weight", f"{dst}post_feedforward_layernorm.weight"),
            rope(f"{src}attention.q_norm.weight", f"{dst}self_attn.q_norm.weight", cfg.n_heads),
            rope(f"{src}attention.k_norm.weight", f"{dst}self_attn.k_norm.weight", cfg.resolved_kv_heads),
        ]
    return out


def model_config(hf: Any) -> dict[str, Any]:
    # Loom's one bias switch covers attention and MLP; OLMo's MLP has none
    llama._require(hf, "attention_bias", not getattr(hf, "attention_bias", False), "false")
    fields = llama.model_config(hf) | {
        "norm_position": "reordered",
        "qk_norm": True,
        "qk_norm_scope": "projection",
    }
    if getattr(hf, "layer_types", None) is not None:  # OLMo 3
        fields |= _windows(hf) | _per_kind_rope(hf)
    return fields


def _per_kind_rope(hf: Any) -> dict[str, Any]:
    """OLMo 3 keeps RoPE parameters per layer kind; Loom has one table for all layers, so they must agree."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kinds = {k: v for k, v in params.items() if k in ("full_attention", "sliding_attention")}
    if not kinds:
        return {}
    first = next(iter(kinds.values()))
    llama._require(
        hf, "rope_parameters", all(v == first for v in kinds.values()), "the same RoPE for every layer kind"
    )
    return llama.rope_fields(SimpleNamespace(rope_parameters=first))
