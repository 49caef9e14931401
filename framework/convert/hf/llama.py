"""Llama (LlamaForCausalLM): the RoPE decoder mapping that Mistral and Qwen3 reuse."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf.mapping import Rename, copy, rope
from framework.models.positions import rotary_dim

LAYER = "model.layers.{i}."


def _kinds(bias: bool) -> list[str]:
    return ["weight", "bias"] if bias else ["weight"]


def attention(cfg: ModelConfig, i: int) -> list[Rename]:
    """q/k rows (the rotated ones, rope_fraction of each head) are permuted into HF's half-rotated RoPE layout; GQA heads keep their order (both sides serve
    query head h from kv head h // (n_heads / kv_heads))."""
    src, dst = f"layers.{i}.attention.", LAYER.format(i=i) + "self_attn."
    rotated = rotary_dim(cfg)  # partial rotary (Bamba): the other channels stay in place
    out = []
    for kind in _kinds(cfg.bias):
        out += [rope(f"{src}wq.{kind}", f"{dst}q_proj.{kind}", cfg.n_heads, rotated)]
        out += [rope(f"{src}wk.{kind}", f"{dst}k_proj.{kind}", cfg.resolved_kv_heads, rotated)]
        out += [copy(f"{src}wv.{kind}", f"{dst}v_proj.{kind}")]
    # Qwen2 (bias_scope qkv) has no o_proj bias
    out += [copy(f"{src}wo.{k}", f"{dst}o_proj.{k}") for k in _kinds(cfg.dense_bias)]
    if cfg.qk_norm:
        # the norm runs per head before RoPE, so its channel weights follow the same permutation (GLM-4.5:
        # of the rotated channels only)
        out += [rope(f"{src}q_norm.weight", f"{dst}q_norm.weight", 1, rotated)]
        out += [rope(f"{src}k_norm.weight", f"{dst}k_norm.weight", 1, rotated)]
    return out


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    src, dst = f"layers.{i}.feed_forward.", LAYER.format(i=i) + "mlp."
    kinds = _kinds(cfg.dense_bias)  # none in Qwen2 (bias_scope qkv)
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    return [copy(f"{src}{ours}.{k}", f"{dst}{theirs}.{k}") for ours, theirs in names.items() for k in kinds]


def renames(
    cfg: ModelConfig,
    ffn: Callable[[ModelConfig, int], list[Rename]] = feed_forward,
    mixer: Callable[[ModelConfig, int], list[Rename]] | None = None,
) -> list[Rename]:
    """`ffn` maps layer i's feed-forward (the MoE families swap in their experts); `mixer` its sequence mixer
    (default: Llama's attention; Qwen3-Next maps its Gated DeltaNet layers too)."""
    mixer = attention if mixer is None else mixer
    out = [
        copy("tok_embeddings.weight", "model.embed_tokens.weight"),
        copy("norm.weight", "model.norm.weight"),
    ]
    for i in range(cfg.n_layers):
        out += block(cfg, i, ffn, mixer)
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


def block(
    cfg: ModelConfig,
    i: int,
    ffn: Callable[[ModelConfig, int], list[Rename]] = feed_forward,
    mixer: Callable[[ModelConfig, int], list[Rename]] | None = None,
) -> list[Rename]:
    """Block i: its two norms, mixer and feed-forward (Loom layers.{i}.* -> model.layers.{i}.*); also the block
    of an MTP depth (framework/convert/hf/mtp.py mtp_renames takes it as its per-layer renames)."""
    layer = LAYER.format(i=i)
    out = [copy(f"layers.{i}.attention_norm.weight", f"{layer}input_layernorm.weight")]
    out += [copy(f"layers.{i}.ffn_norm.weight", f"{layer}post_attention_layernorm.weight")]
    return out + (attention if mixer is None else mixer)(cfg, i) + ffn(cfg, i)


def optional(name: str) -> bool:
    """A tied lm_head may be stored beside the embedding; rotary inv_freq buffers appear in old checkpoints."""
    return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")


def model_config(hf: Any) -> dict[str, Any]:
    """ModelConfig fields of a Llama-like transformers config."""
    _require(hf, "hidden_act", hf.hidden_act == "silu", "silu (SwiGLU)")
    bias = bool(getattr(hf, "attention_bias", False))
    _require(hf, "mlp_bias", getattr(hf, "mlp_bias", bias) == bias, f"equal to attention_bias={bias}")
    heads = hf.num_attention_heads
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": heads,
        "kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        "ffn_hidden": hf.intermediate_size,
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": hf.rms_norm_eps,
        "bias": bias,
        "position": "rope",
        "max_seq_len": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "softmax_scale": "inv_sqrt_dk",
    } | rope_fields(hf)


def rope_fields(hf: Any) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    _require(
        hf, "rope_parameters.rope_type", kind in ("default", "linear", "llama3"), "default, linear or llama3"
    )
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "linear":
        out |= {"rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    elif kind == "llama3":
        out |= {
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_seq_len": int(params["original_max_position_embeddings"]),
        }
    return out


def _require(hf: Any, key: str, ok: bool, needs: str) -> None:
    if not ok:
        value = getattr(hf, key, None)
        raise ConfigError(
            "config.json", key, value, f"{type(hf).__name__} with this value has no Loom equivalent (needs {needs})",
            "import a checkpoint of a supported configuration",
        )  # fmt: skip
