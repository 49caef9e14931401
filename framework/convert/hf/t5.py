"""T5 (T5ForConditionalGeneration), v1.0 (ReLU) or v1.1 (gated GELU): unscaled attention, one relative-position
bias table per stack (HF stores it in block 0), RMSNorm, a shared input embedding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from framework.config.schema import ModelConfig
from framework.convert.hf.llama import _require
from framework.convert.hf.mapping import Rename, copy, duplicate

_ATTENTION = {"wq": "q", "wk": "k", "wv": "v", "wo": "o"}


def _attention(src: str, dst: str) -> list[Rename]:
    return [copy(f"{src}{ours}.weight", f"{dst}{theirs}.weight") for ours, theirs in _ATTENTION.items()]


def _mlp(cfg: ModelConfig, src: str, dst: str) -> list[Rename]:
    # gated: wi_0 goes through the activation (Loom's gate w1), wi_1 is the linear branch (Loom's w3)
    names = {"w1": "wi_0", "w3": "wi_1", "w2": "wo"} if cfg.mlp == "geglu" else {"w1": "wi", "w2": "wo"}
    return [copy(f"{src}{ours}.weight", f"{dst}{theirs}.weight") for ours, theirs in names.items()]


def _stack(cfg: ModelConfig, stack: str, n_layers: int) -> list[Rename]:
    decoder = stack == "decoder"
    bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    out = [
        copy(f"{stack}.relative_bias.weight", bias),
        copy(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight"),
    ]
    for i in range(n_layers):
        src, dst = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
        out += [copy(f"{src}attention_norm.weight", f"{dst}0.layer_norm.weight")]
        out += _attention(f"{src}attention.", f"{dst}0.SelfAttention.")
        if decoder:
            out += [copy(f"{src}cross_attention_norm.weight", f"{dst}1.layer_norm.weight")]
            out += _attention(f"{src}cross_attention.", f"{dst}1.EncDecAttention.")
        ffn = 2 if decoder else 1
        out += [copy(f"{src}ffn_norm.weight", f"{dst}{ffn}.layer_norm.weight")]
        out += _mlp(cfg, f"{src}feed_forward.", f"{dst}{ffn}.DenseReluDense.")
    return out


def renames(cfg: ModelConfig) -> list[Rename]:
    # transformers 5 reads each stack's embed_tokens separately unless the head is tied, so all three are written
    out = [copy("tok_embeddings.weight", "shared.weight")]
    out += [duplicate("tok_embeddings.weight", f"{s}.embed_tokens.weight") for s in ("encoder", "decoder")]
    out += _stack(cfg, "encoder", cfg.n_layers) + _stack(cfg, "decoder", cfg.decoder_layers)
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def optional(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith("embed_tokens.weight")


def tied(state: Mapping[str, torch.Tensor]) -> bool:
    """transformers 5 always says tie_word_embeddings=True for T5 and unties a head stored with other values."""
    head = state.get("lm_head.weight")
    return head is None or torch.equal(head, state["shared.weight"])


def model_config(hf: Any) -> dict[str, Any]:
    gated = bool(hf.is_gated_act)
    act = hf.dense_act_fn
    _require(hf, "feed_forward_proj", act in (("gelu_new", "gelu_pytorch_tanh") if gated else ("relu",)),
             "relu or gated-gelu")  # fmt: skip
    _require(hf, "scale_decoder_outputs", not getattr(hf, "scale_decoder_outputs", False), "false (Loom does "
             "not scale a tied T5 head by d_model**-0.5)")  # fmt: skip
    return {
        "family": "encoder_decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.d_model,
        "n_layers": hf.num_layers,
        # Loom's defaults where HF states the default explicitly, so an exported config imports back equal
        "n_decoder_layers": None if hf.num_decoder_layers == hf.num_layers else hf.num_decoder_layers,
        "n_heads": hf.num_heads,
        "head_dim": hf.d_kv,
        "ffn_hidden": hf.d_ff,
        "mlp": "geglu" if gated else "relu",
        "gelu_approximate": "tanh" if gated else "none",
        "norm": "rmsnorm",
        "norm_eps": hf.layer_norm_epsilon,
        "bias": False,
        "position": "relative_bias",
        "relative_buckets": hf.relative_attention_num_buckets,
        "relative_max_distance": hf.relative_attention_max_distance,
        "softmax_scale": "none",
        "max_seq_len": int(getattr(hf, "n_positions", None) or 512),
        "tie_embeddings": True,  # see tied(): decided from the weights
    }
