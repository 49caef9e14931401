"""Gemma 2 (Gemma2ForCausalLM): Gemma's weights plus a norm after each branch (sandwich norms), soft-capped
attention scores and final logits, and query_pre_attn_scalar ** -0.5 as the softmax scale.

Loom's sliding window is the same for every layer. transformers' Gemma 2 alternates sliding and full layers
(`layer_types`); such a config imports only where the window never binds (sliding_window >= max_position_embeddings:
then every layer computes full causal attention), and is refused otherwise, naming layer_types. A config whose
layers are all sliding or all full imports exactly; an export writes one of those two.
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
    return fields | {
        "sandwich_norm": True,
        "softmax_scale": "inv_sqrt_dk" if scalar == head_dim else float(scalar**-0.5),
        "final_logit_softcap": _cap(hf.final_logit_softcapping),
        "attention_softcap": _cap(hf.attn_logit_softcapping),
        "sliding_window": _window(hf),
    }


def _cap(value: float | None) -> float | None:
    return None if value is None else float(value)


def _window(hf: Any) -> int | None:
    """Loom's uniform window for transformers' per-layer `layer_types` (see the module docstring)."""
    kinds = set(hf.layer_types or [])
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        _refuse(hf, f"has layer kinds {sorted(unknown)} (Loom: full_attention or sliding_attention)")
    if kinds <= {"full_attention"}:
        return None
    window = hf.sliding_window
    if kinds == {"sliding_attention"}:
        return window
    if window is None or window >= hf.max_position_embeddings:
        return None  # sliding layers never cut a key off within max_position_embeddings: all full attention
    _refuse(
        hf,
        f"mixes sliding ({window}-token window) and full attention layers; Loom's window is the same for "
        "every layer",
    )
    return None


def _refuse(hf: Any, rule: str) -> None:
    raise ConfigError(
        "config.json", "layer_types", hf.layer_types, rule,
        "import with max_position_embeddings <= sliding_window in config.json (within the window sliding and "
        "full attention are the same), or give every layer the same kind",
    )  # fmt: skip
