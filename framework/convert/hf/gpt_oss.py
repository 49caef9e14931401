"""gpt-oss (GptOssForCausalLM): Llama's pre-norm layers with learned attention sinks, sliding-window and full
layers alternating, YaRN RoPE, and every feed-forward an MoE of biased clamped-SwiGLU experts.

Attention: q/k/v/o with biases when attention_bias (Loom's bias: true, bias_scope all), q/k rows permuted into
HF's half-rotated RoPE layout (llama.attention), and `self_attn.sinks` [heads] = Loom's `attention.sinks`.
layer_types sliding_attention / full_attention = Loom's model.layers.pattern attention_local / attention, the
window `sliding_window` = model.layers.local_window; both kinds share one RoPE (YaRN, truncate false in the
released models), so local_rope_theta stays unset.

Router (GptOssTopKRouter): `mlp.router.weight` [E, D] and `.bias` [E] = Loom's router.gate (moe.router_bias);
top-k on the logits, weights softmax over the k chosen logits = Loom's softmax router renormalised.
Experts (GptOssExperts, the same names in memory and in a bf16 checkpoint): gate_up_proj [E, D, 2H] whose columns
interleave gate and up (gate = [..., ::2], up = [..., 1::2]), gate_up_proj_bias [E, 2H] alike, down_proj [E, H, D]
and down_proj_bias [E, D]: Loom's w1/w3 [E, H, D], b1/b3 [E, H], w2 [E, D, H] and b2 [E, D]. The clamped SwiGLU's
swiglu_alpha / swiglu_limit are model.swiglu_alpha / swiglu_limit. The Hub's MXFP4 checkpoints keep the expert
matrices quantized (`*_blocks`, `*_scales`): they are refused with the fix (dequantize with transformers first).
"""

from __future__ import annotations

from typing import Any

import torch

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, ModelConfig, MoEConfig
from framework.convert.hf import deepseek_v3, llama
from framework.convert.hf.mapping import Rename, copy, layer_period

Tensor = torch.Tensor
LAYER = llama.LAYER
optional = llama.optional
LAYER_KINDS = {"attention_local": "sliding_attention", "attention": "full_attention"}


def _interleave(tensors: list[Tensor]) -> Tensor:
    """gate [E, H, ...], up [E, H, ...] -> [E, 2H, ...] rows g0 u0 g1 u1 ... (transformers' column order)."""
    return torch.stack(tensors, dim=2).flatten(1, 2)


def _deinterleave(t: Tensor) -> list[Tensor]:
    return [t[:, 0::2].contiguous(), t[:, 1::2].contiguous()]


def _gate_up(tensors: list[Tensor]) -> Tensor:
    return _interleave(tensors).transpose(1, 2)  # [E, 2H, D] -> [E, D, 2H]: x @ W in transformers


def _gate_up_back(t: Tensor) -> list[Tensor]:
    return _deinterleave(t.transpose(1, 2))


def _transposed(t: list[Tensor]) -> Tensor:
    return t[0].transpose(1, 2)


def _transposed_back(t: Tensor) -> list[Tensor]:
    return [t.transpose(1, 2).contiguous()]


def attention(cfg: ModelConfig, i: int) -> list[Rename]:
    """Llama's attention tensors (biases on q/k/v and o with attention_bias) and the sinks."""
    dst = LAYER.format(i=i) + "self_attn."
    return llama.attention(cfg, i) + [copy(f"layers.{i}.attention.sinks", f"{dst}sinks")]


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    """Router (weight and bias) and the stacked experts with their biases (module docstring)."""
    src, dst = f"layers.{i}.feed_forward.", LAYER.format(i=i) + "mlp."
    ex = f"{src}experts."
    return [
        copy(f"{src}router.gate.weight", f"{dst}router.weight"),
        copy(f"{src}router.gate.bias", f"{dst}router.bias"),
        Rename((f"{ex}w1", f"{ex}w3"), f"{dst}experts.gate_up_proj", _gate_up, _gate_up_back),
        Rename((f"{ex}b1", f"{ex}b3"), f"{dst}experts.gate_up_proj_bias", _interleave, _deinterleave),
        Rename((f"{ex}w2",), f"{dst}experts.down_proj", _transposed, _transposed_back),
        copy(f"{ex}b2", f"{dst}experts.down_proj_bias"),
    ]


def renames(cfg: ModelConfig) -> list[Rename]:
    return llama.renames(cfg, ffn=feed_forward, mixer=attention)


def from_files(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The bf16 layout is the in-memory one; MXFP4-quantized experts are refused with the way out."""
    quantized = sorted(k for k in state if k.endswith(("_blocks", "_scales")))
    if quantized:
        raise ConfigError(
            None, "Hugging Face weights", quantized[0],
            "holds MXFP4-quantized experts (the Hub's gpt-oss release); Loom imports full-precision weights",
            "dequantize first: transformers' from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True))"
            " then save_pretrained, or use a bf16 copy of the checkpoint",
        )  # fmt: skip
    return state


def hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """GptOssConfig's own fields (configs.py adds the shared decoder ones)."""
    assert cfg.moe is not None
    layers = cfg.layers or LayersConfig()
    return {
        "intermediate_size": cfg.moe.resolved_expert_hidden(cfg.ffn_hidden),
        "num_local_experts": cfg.moe.n_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_loss,
        "swiglu_alpha": cfg.swiglu_alpha,
        "swiglu_limit": cfg.swiglu_limit,
        "attention_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
        "sliding_window": layers.local_window,
        "layer_types": [LAYER_KINDS[m] for m in cfg.mixers],
        "rope_parameters": deepseek_v3.rope_parameters(cfg),
    }


def model_config(hf: Any) -> dict[str, Any]:
    back = {v: k for k, v in LAYER_KINDS.items()}
    unknown = sorted(set(hf.layer_types) - set(back))
    if unknown:
        raise ConfigError(
            "config.json", "layer_types", unknown[0], "is not a gpt-oss layer type Loom builds",
            "import a checkpoint whose layer_types are sliding_attention / full_attention",
        )  # fmt: skip
    pattern = layer_period([back[kind] for kind in hf.layer_types])
    bias = bool(hf.attention_bias)
    moe = MoEConfig(
        n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, expert_hidden=hf.intermediate_size,
        router="softmax", renormalize=True, aux_loss=float(hf.router_aux_loss_coef), router_bias=True,
        expert_linear_bias=True,
    )  # fmt: skip
    heads = hf.num_attention_heads
    return {
        "family": "decoder", "vocab_size": hf.vocab_size, "d_model": hf.hidden_size,
        "n_layers": hf.num_hidden_layers, "n_heads": heads, "kv_heads": hf.num_key_value_heads,
        "head_dim": hf.head_dim, "ffn_hidden": hf.intermediate_size, "mlp": "clamped_swiglu",
        "swiglu_alpha": float(hf.swiglu_alpha), "swiglu_limit": float(hf.swiglu_limit), "norm": "rmsnorm",
        "norm_eps": hf.rms_norm_eps, "bias": bias, "position": "rope", "max_seq_len": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings), "softmax_scale": "inv_sqrt_dk", "attention_sinks": True,
        "attention_dropout": float(hf.attention_dropout), "moe": moe,
        "layers": LayersConfig(pattern=pattern, local_window=hf.sliding_window if "attention_local" in pattern
                               else None),
    } | deepseek_v3.rope_fields(hf)  # fmt: skip
