"""Gemma 2 (Gemma2ForCausalLM): Gemma's weights plus a norm after each branch (sandwich norms), soft-capped
attention scores and final logits, and query_pre_attn_scalar ** -0.5 as the softmax scale.

Its per-layer `layer_types` (by default sliding, full, sliding, ...) are Loom's sliding_window plus the list of
full_attention_layers exempt from it.
"""

from __future__ import annotations

from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf import gemma, llama
from framework.convert.hf.mapping import Rename, copy

optional = llama.optional


def renames(cfg: ModelConfig) -> list[Rename]:
    """Llama's names, except the feed-forward's pre-norm, which Gemma 2 calls pre_feedforward_layernorm (its
    post_attention_layernorm is the norm of the attention output)."""
    out = [r for r in llama.renames(cfg) if not r.loom[0].endswith(".ffn_norm.weight")]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", llama.LAYER.format(i=i)
        out += [
            copy(f"{src}attention_post_norm.weight", f"{dst}post_attention_layernorm.weight"),
            copy(f"{src}ffn_norm.weight", f"{dst}pre_feedforward_layernorm.weight"),
            copy(f"{src}ffn_post_norm.weight", f"{dst}post_feedforward_layernorm.weight"),
        ]
    return out


def model_config(hf: Any) -> dict[str, Any]:
    fields = gemma.common_fields(hf, getattr(hf, "hidden_activation", None), "hidden_activation")
    head_dim = fields["head_dim"]
    scalar = hf.query_pre_attn_scalar
    return (
        fields
        | {
            "sandwich_norm": True,
            "softmax_scale": "inv_sqrt_dk" if scalar == head_dim else float(scalar**-0.5),
            "final_logit_softcap": _cap(hf.final_logit_softcapping),
            "attention_softcap": _cap(hf.attn_logit_softcapping),
        }
        | _windows(hf)
    )


def _cap(value: float | None) -> float | None:
    return None if value is None else float(value)


def _windows(hf: Any) -> dict[str, Any]:
    """sliding_window and full_attention_layers for transformers' per-layer `layer_types`."""
    types = list(hf.layer_types or ["full_attention"] * hf.num_hidden_layers)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(
            "config.json", "layer_types", types, f"has layer kinds {sorted(unknown)} Loom has no equivalent for",
            "import a config whose layers are full_attention or sliding_attention",
        )  # fmt: skip
    if "sliding_attention" not in types:
        return {"sliding_window": None, "full_attention_layers": None}
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    return {"sliding_window": hf.sliding_window, "full_attention_layers": full or None}
