"""Mistral (MistralForCausalLM): Llama's weights plus a sliding attention window (a config field only)."""

from __future__ import annotations

from typing import Any

from framework.convert.hf import llama

renames = llama.renames
optional = llama.optional


def model_config(hf: Any) -> dict[str, Any]:
    return llama.model_config(hf) | {"sliding_window": hf.sliding_window}
