"""Qwen3 (Qwen3ForCausalLM): Llama's weights plus per-head RMSNorm of queries and keys (QK-norm)."""

from __future__ import annotations

from typing import Any

from framework.convert.hf import llama

renames = llama.renames  # includes q_norm / k_norm because cfg.qk_norm is set
optional = llama.optional


def model_config(hf: Any) -> dict[str, Any]:
    window = hf.sliding_window if getattr(hf, "use_sliding_window", False) else None
    return llama.model_config(hf) | {"qk_norm": True, "sliding_window": window}
