"""BLOOM (BloomForCausalLM): ALiBi decoder with LayerNorm, an embedding LayerNorm, a GELU(tanh) MLP of width
4 * d_model and one fused query/key/value projection laid out per head as [q_h, k_h, v_h]."""

from __future__ import annotations

from typing import Any

import torch

from framework.config.schema import ModelConfig
from framework.convert.hf.mapping import Rename, copy


def _fused_qkv(src: str, dst: str, heads: int, kind: str) -> Rename:
    names = tuple(f"{src}{w}.{kind}" for w in ("wq", "wk", "wv"))

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([p.unflatten(0, (heads, -1)) for p in parts], dim=1).flatten(0, 2)

    def split(fused: torch.Tensor) -> list[torch.Tensor]:
        return [t.flatten(0, 1).contiguous() for t in fused.unflatten(0, (heads, 3, -1)).unbind(1)]

    return Rename(names, f"{dst}query_key_value.{kind}", join, split)


def _both(src: str, dst: str) -> list[Rename]:
    return [copy(f"{src}.{k}", f"{dst}.{k}") for k in ("weight", "bias")]


def renames(cfg: ModelConfig) -> list[Rename]:
    out = [copy("tok_embeddings.weight", "transformer.word_embeddings.weight")]
    out += _both("embed_norm", "transformer.word_embeddings_layernorm") + _both("norm", "transformer.ln_f")
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        out += _both(f"{src}attention_norm", f"{dst}input_layernorm")
        out += [
            _fused_qkv(f"{src}attention.", f"{dst}self_attention.", cfg.n_heads, k)
            for k in ("weight", "bias")
        ]
        out += _both(f"{src}attention.wo", f"{dst}self_attention.dense")
        out += _both(f"{src}ffn_norm", f"{dst}post_attention_layernorm")
        out += _both(f"{src}feed_forward.w1", f"{dst}mlp.dense_h_to_4h")
        out += _both(f"{src}feed_forward.w2", f"{dst}mlp.dense_4h_to_h")
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def optional(name: str) -> bool:
    return name == "lm_head.weight"


def model_config(hf: Any) -> dict[str, Any]:
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "n_layers": hf.n_layer,
        "n_heads": hf.n_head,
        "ffn_hidden": 4 * hf.hidden_size,
        "mlp": "gelu",
        "gelu_approximate": "tanh",
        "norm": "layernorm",
        "norm_eps": hf.layer_norm_epsilon,
        "bias": True,
        "position": "alibi",
        "embedding_norm": True,
        "max_seq_len": int(
            getattr(hf, "n_positions", None) or 2048
        ),  # ALiBi has no table: this only bounds inputs
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
