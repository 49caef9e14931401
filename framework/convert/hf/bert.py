"""BERT (BertForMaskedLM): post-norm LayerNorm encoder, learned positions, token types, an embedding LayerNorm and
the masked-LM head transform; the output bias lives in the head (`cls.predictions.bias`)."""

from __future__ import annotations

from typing import Any

from framework.config.schema import ModelConfig
from framework.convert.hf.llama import _require
from framework.convert.hf.mapping import Rename, copy, duplicate


def _both(src: str, dst: str) -> list[Rename]:
    return [copy(f"{src}.{k}", f"{dst}.{k}") for k in ("weight", "bias")]


def _layer(i: int) -> list[Rename]:
    src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
    out = _both(f"{src}attention.wq", f"{dst}attention.self.query")
    out += _both(f"{src}attention.wk", f"{dst}attention.self.key")
    out += _both(f"{src}attention.wv", f"{dst}attention.self.value")
    out += _both(f"{src}attention.wo", f"{dst}attention.output.dense")
    # post-norm: the norm after each residual sum, named after the sub-layer's output in HF
    out += _both(f"{src}attention_norm", f"{dst}attention.output.LayerNorm")
    out += _both(f"{src}feed_forward.w1", f"{dst}intermediate.dense")
    out += _both(f"{src}feed_forward.w2", f"{dst}output.dense")
    return out + _both(f"{src}ffn_norm", f"{dst}output.LayerNorm")


def renames(cfg: ModelConfig) -> list[Rename]:
    emb = "bert.embeddings."
    out = [copy("tok_embeddings.weight", f"{emb}word_embeddings.weight")]
    out += [copy("pos_embeddings.weight", f"{emb}position_embeddings.weight")]
    out += [copy("type_embeddings.weight", f"{emb}token_type_embeddings.weight")]
    out += _both("embed_norm", f"{emb}LayerNorm")
    for i in range(cfg.n_layers):
        out += _layer(i)
    out += _both("head_transform.dense", "cls.predictions.transform.dense")
    out += _both("head_transform.norm", "cls.predictions.transform.LayerNorm")
    bias = "output_bias" if cfg.tie_embeddings else "output.bias"
    out += [copy(bias, "cls.predictions.bias"), duplicate(bias, "cls.predictions.decoder.bias")]
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "cls.predictions.decoder.weight"))
    return out


def optional(name: str) -> bool:
    return name in ("cls.predictions.decoder.weight", "bert.embeddings.position_ids") or name.startswith(
        "bert.pooler."
    )


def model_config(hf: Any) -> dict[str, Any]:
    gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
    _require(hf, "hidden_act", hf.hidden_act in gelu, "gelu, gelu_new or gelu_pytorch_tanh")
    _require(hf, "position_embedding_type", getattr(hf, "position_embedding_type", "absolute") == "absolute",
             "absolute")  # fmt: skip
    return {
        "family": "encoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": hf.num_attention_heads,
        "ffn_hidden": hf.intermediate_size,
        "mlp": "gelu",
        "gelu_approximate": gelu[hf.hidden_act],
        "norm": "layernorm",
        "norm_eps": hf.layer_norm_eps,
        "norm_position": "post",
        "bias": True,
        "position": "learned",
        "max_seq_len": hf.max_position_embeddings,
        "type_vocab_size": hf.type_vocab_size,
        "embedding_norm": True,
        "mlm_head_transform": True,
        "output_bias": True,
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
