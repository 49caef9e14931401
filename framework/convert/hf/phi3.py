"""Phi-3 (Phi3ForCausalLM): Llama's computation with two fused matrices per layer: qkv_proj = [q; k; v] and
gate_up_proj = [gate; up] (rows stacked, so HF's split and chunk read them back). The architecture fields cannot
tell it from Llama, so model.hf_architecture: phi3 records it (import sets it, export reads it)."""

from __future__ import annotations

from typing import Any

import torch

from framework.config.schema import ModelConfig
from framework.convert.hf import llama
from framework.convert.hf.llama import LAYER, _require
from framework.convert.hf.mapping import Rename, copy, halves_to_interleaved, interleaved_to_halves


def _qkv(cfg: ModelConfig, i: int) -> Rename:
    """[q; k; v] rows; q and k permuted into HF's half-rotated RoPE layout, as Llama's q_proj / k_proj."""
    src = f"layers.{i}.attention."
    heads, kv = cfg.n_heads, cfg.resolved_kv_heads
    sizes = [heads * cfg.resolved_head_dim] + [kv * cfg.resolved_head_dim] * 2

    def fuse(parts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        return torch.cat([interleaved_to_halves(q, heads), interleaved_to_halves(k, kv), v])

    def split(fused: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = fused.split(sizes)
        return [halves_to_interleaved(q, heads), halves_to_interleaved(k, kv), v.contiguous()]

    names = tuple(f"{src}{w}.weight" for w in ("wq", "wk", "wv"))
    return Rename(names, LAYER.format(i=i) + "self_attn.qkv_proj.weight", fuse, split)


def _gate_up(cfg: ModelConfig, i: int) -> Rename:
    """[gate; up] rows: HF chunks the output in two, gate first (Loom's w1 is the gate, w3 the up projection)."""
    src = f"layers.{i}.feed_forward."
    return Rename(
        (f"{src}w1.weight", f"{src}w3.weight"),
        LAYER.format(i=i) + "mlp.gate_up_proj.weight",
        torch.cat,
        lambda fused: [t.contiguous() for t in fused.chunk(2)],
    )


def _layer(cfg: ModelConfig, i: int) -> list[Rename]:
    src, dst = f"layers.{i}.", LAYER.format(i=i)
    return [
        copy(f"{src}attention_norm.weight", f"{dst}input_layernorm.weight"),
        copy(f"{src}ffn_norm.weight", f"{dst}post_attention_layernorm.weight"),
        _qkv(cfg, i),
        copy(f"{src}attention.wo.weight", f"{dst}self_attn.o_proj.weight"),
        _gate_up(cfg, i),
        copy(f"{src}feed_forward.w2.weight", f"{dst}mlp.down_proj.weight"),
    ]


def renames(cfg: ModelConfig) -> list[Rename]:
    out = [
        copy("tok_embeddings.weight", "model.embed_tokens.weight"),
        copy("norm.weight", "model.norm.weight"),
    ]
    for i in range(cfg.n_layers):
        out += _layer(cfg, i)
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


optional = llama.optional


def model_config(hf: Any) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    factor = params.get("partial_rotary_factor", 1.0)
    _require(hf, "partial_rotary_factor", factor == 1.0, "1.0: RoPE on every channel of a head")
    return llama.model_config(hf) | {"sliding_window": hf.sliding_window, "hf_architecture": "phi3"}
