"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's weights and names plus per-head QK-norm
(with Gemma's (1 + w) gain, as every norm here), and local and global layers with RoPE of their own.

transformers' `layer_types` are model.layers.pattern in full: a sliding_attention block is attention_local
(window layers.local_window = sliding_window, RoPE base layers.local_rope_theta, never scaled) and a
full_attention block is attention (no window; rope_theta and the scaling of rope_parameters.full_attention).
Soft-capping is off by default; a final logit cap is kept when set, as in Gemma 2. transformers' Gemma 3
(5.24) stores attn_logit_softcapping but never applies it, so it imports as no cap (what transformers computes)
and Loom's attention_softcap is refused on export.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from framework.config.schema import LayersConfig
from framework.convert.hf import gemma2, llama

renames = gemma2.renames  # llama.attention adds q_norm / k_norm (permuted as q / k rows) for cfg.qk_norm
optional = gemma2.optional
MIXER = {"sliding_attention": "attention_local", "full_attention": "attention"}


def model_config(hf: Any) -> dict[str, Any]:
    fields = gemma2.model_config(hf) | _rope(hf)  # Gemma 2's refuses layer kinds other than sliding / full
    types = list(hf.layer_types)
    return fields | {
        "qk_norm": True,
        "attention_softcap": None,  # not applied by Gemma3Attention (see above)
        "sliding_window": None,
        "full_attention_layers": None,
        "layers": LayersConfig(
            pattern=[MIXER[kind] for kind in types],
            local_window=hf.sliding_window if "sliding_attention" in types else None,
            local_rope_theta=_local_theta(hf),
        ),
    }


def _kind_parameters(hf: Any, kind: str) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    return dict(params.get(kind) or {})


def _rope(hf: Any) -> dict[str, Any]:
    """Global layers' RoPE: rope_parameters.full_attention (any type Llama's mapping reads)."""
    return llama.rope_fields(SimpleNamespace(rope_parameters=_kind_parameters(hf, "full_attention")))


def _local_theta(hf: Any) -> float | None:
    """Local layers' RoPE base (None: the global layers' RoPE, scaling included, as Loom's attention_local
    without local_rope_theta); a base of their own is never scaled in Loom, so it must be the default type."""
    local = _kind_parameters(hf, "sliding_attention")
    if local == _kind_parameters(hf, "full_attention"):
        return None
    kind = local.get("rope_type", "default")
    llama._require(hf, "rope_parameters", kind == "default", "rope_type default for sliding_attention")
    return float(local.get("rope_theta", 10000.0))
