"""GPT-2 (GPT2LMHeadModel): learned absolute positions, pre-LayerNorm blocks with a final ln_f, a GELU MLP (tanh
form, "gelu_new"), biases everywhere, one fused c_attn = [q, k, v] and a head tied to the token embedding by
default. Its linear layers are HF `Conv1D`s, whose weights are stored transposed ([in, out]): every matrix is
transposed on the way."""

from __future__ import annotations

from typing import Any

import torch

from framework.config.schema import ModelConfig
from framework.convert.hf.llama import _require
from framework.convert.hf.mapping import Rename, copy

LAYER = "transformer.h.{i}."


def _conv1d(loom: str, hf: str) -> list[Rename]:
    """nn.Linear weight [out, in] <-> Conv1D weight [in, out]; the bias is the same vector."""
    weight = Rename((f"{loom}.weight",), f"{hf}.weight", lambda t: t[0].t(), lambda t: [t.t().contiguous()])
    return [weight, copy(f"{loom}.bias", f"{hf}.bias")]


def _c_attn(src: str, dst: str) -> list[Rename]:
    """c_attn's output columns are [q | k | v] (HF splits them in three, each d_model wide): the weight is
    [wq; wk; wv] transposed, the bias the three biases end to end."""
    weights, biases = (tuple(f"{src}{w}.{kind}" for w in ("wq", "wk", "wv")) for kind in ("weight", "bias"))
    return [
        Rename(
            weights,
            f"{dst}.weight",
            lambda t: torch.cat(t).t(),
            lambda t: [p.t().contiguous() for p in t.chunk(3, 1)],
        ),
        Rename(biases, f"{dst}.bias", torch.cat, lambda t: [p.contiguous() for p in t.chunk(3)]),
    ]


def _norm(loom: str, hf: str) -> list[Rename]:
    return [copy(f"{loom}.{k}", f"{hf}.{k}") for k in ("weight", "bias")]


def _layer(i: int) -> list[Rename]:
    src, dst = f"layers.{i}.", LAYER.format(i=i)
    out = _norm(f"{src}attention_norm", f"{dst}ln_1")
    out += _c_attn(f"{src}attention.", f"{dst}attn.c_attn")
    out += _conv1d(f"{src}attention.wo", f"{dst}attn.c_proj")
    out += _norm(f"{src}ffn_norm", f"{dst}ln_2")
    out += _conv1d(f"{src}feed_forward.w1", f"{dst}mlp.c_fc")
    return out + _conv1d(f"{src}feed_forward.w2", f"{dst}mlp.c_proj")


def renames(cfg: ModelConfig) -> list[Rename]:
    out = [
        copy("tok_embeddings.weight", "transformer.wte.weight"),
        copy("pos_embeddings.weight", "transformer.wpe.weight"),
    ]
    for i in range(cfg.n_layers):
        out += _layer(i)
    out += _norm("norm", "transformer.ln_f")
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def from_files(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files saved from the bare GPT2Model (the original openai-community/gpt2 ones among them) name tensors
    without the `transformer.` prefix; transformers adds it when loading, and so does this."""
    if any(name.startswith("transformer.") for name in state):
        return state
    return {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in state.items()}


def optional(name: str) -> bool:
    """A tied lm_head beside wte; old checkpoints also store each layer's causal-mask buffers (attn.bias,
    attn.masked_bias), which transformers ignores too."""
    return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))


def model_config(hf: Any) -> dict[str, Any]:
    gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
    _require(hf, "activation_function", hf.activation_function in gelu, "gelu, gelu_new or gelu_pytorch_tanh")
    _require(hf, "scale_attn_weights", hf.scale_attn_weights, "true: scores scaled by 1/sqrt(head_dim)")
    _require(hf, "scale_attn_by_inverse_layer_idx", not hf.scale_attn_by_inverse_layer_idx, "false")
    _require(hf, "add_cross_attention", not hf.add_cross_attention, "false: a decoder-only model")
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.n_embd,
        "n_layers": hf.n_layer,
        "n_heads": hf.n_head,
        "ffn_hidden": hf.n_inner or 4 * hf.n_embd,
        "mlp": "gelu",
        "gelu_approximate": gelu[hf.activation_function],
        "norm": "layernorm",
        "norm_eps": hf.layer_norm_epsilon,
        "bias": True,
        "position": "learned",
        "max_seq_len": hf.n_positions,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "softmax_scale": "inv_sqrt_dk",
    }
