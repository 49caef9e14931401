"""Qwen2 (Qwen2ForCausalLM): Llama's weights plus biases on the query, key and value projections only (none on
o_proj or the MLP: model.bias_scope qkv)."""

from __future__ import annotations

from typing import Any

from framework.convert.hf import llama
from framework.convert.hf.llama import _require

renames = llama.renames  # q/k/v biases because cfg.bias is set, none on o_proj or the MLP (cfg.dense_bias)
optional = llama.optional


def model_config(hf: Any) -> dict[str, Any]:
    # windowed layers (max_window_layers on) are not a uniform window: refused rather than read as full attention
    sliding = [t for t in getattr(hf, "layer_types", None) or [] if t != "full_attention"]
    _require(hf, "use_sliding_window", not sliding, "false: every layer full attention")
    return llama.model_config(hf) | {"bias": True, "bias_scope": "qkv"}
