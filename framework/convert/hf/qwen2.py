"""Qwen2 (Qwen2ForCausalLM): Llama's weights plus biases on the query, key and value projections only (none on
o_proj or the MLP: model.bias_scope qkv)."""

from __future__ import annotations

from typing import Any

from framework.convert.hf import llama
from framework.convert.hf.llama import _require

renames = llama.renames  # q/k/v biases because cfg.bias is set, none on o_proj or the MLP (cfg.dense_bias)
optional = llama.optional


def model_config(hf: Any) -> dict[str, Any]:
    # layer_types (derived from use_sliding_window and max_window_layers) says which layers slide; Loom's
    # window is all layers or none, so a mix is refused rather than read as full attention
    kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
    _require(hf, "layer_types", len(kinds) == 1, "one attention type for every layer (max_window_layers 0)")
    window = hf.sliding_window if kinds == {"sliding_attention"} else None
    return llama.model_config(hf) | {"bias": True, "bias_scope": "qkv", "sliding_window": window}
