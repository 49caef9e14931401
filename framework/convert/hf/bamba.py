"""Bamba (BambaForCausalLM): a Mamba-2 / attention hybrid with a SwiGLU MLP in every block.

Loom holds it as model.layers.pattern of mamba2 and attention blocks (feed_forward true) plus model.mamba2.
Every block is pre-norm, x + mixer(input_layernorm(x)) then x + mlp(pre_ff_layernorm(x)), as Loom's; the mixer
sits under `mamba` (Mamba-2, mapped as in mamba2.py) or `self_attn` (Llama's attention: GQA, partial rotary with
transformers' hard-coded partial_rotary_factor 0.5, q/k rows permuted on the rotated half only). transformers
names the attention layers in attn_layer_indices (its layers_block_type: full_attention / linear_attention);
the attention's head_dim is an extra config attribute that BambaAttention reads (default hidden / heads).
mamba_proj_bias and a time_step_limit other than (0, inf) are refused (mamba2.py); Bamba's MLP and attention
biases (mlp_bias, attention_bias) are Loom's one bias switch, so they must agree.
"""

from __future__ import annotations

from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, ModelConfig
from framework.convert.hf import llama, mamba2
from framework.convert.hf.mapping import Rename, copy, layer_period

LAYER = llama.LAYER  # model.layers.{i}.
ROPE_FRACTION = 0.5
"""BambaConfig.__post_init__ sets partial_rotary_factor 0.5 whatever the config file says."""


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    src, dst = f"layers.{i}.feed_forward.", LAYER.format(i=i) + "feed_forward."
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    kinds = llama._kinds(cfg.dense_bias)
    return [copy(f"{src}{ours}.{k}", f"{dst}{theirs}.{k}") for ours, theirs in names.items() for k in kinds]


def renames(cfg: ModelConfig) -> list[Rename]:
    out = [
        copy("tok_embeddings.weight", "model.embed_tokens.weight"),
        copy("norm.weight", "model.final_layernorm.weight"),
    ]
    for i in range(cfg.n_layers):
        layer = LAYER.format(i=i)
        out.append(copy(f"layers.{i}.attention_norm.weight", f"{layer}input_layernorm.weight"))
        out.append(copy(f"layers.{i}.ffn_norm.weight", f"{layer}pre_ff_layernorm.weight"))
        if cfg.mixer(i) == "mamba2":
            out += mamba2.mixer(cfg, f"layers.{i}.mamba.", f"{layer}mamba.")
        else:
            out += llama.attention(cfg, i)
        out += feed_forward(cfg, i)
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "lm_head.weight"))
    return out


optional = llama.optional


def attention_layers(cfg: ModelConfig) -> list[int]:
    """attn_layer_indices: the blocks whose mixer is attention."""
    return [i for i, name in enumerate(cfg.mixers) if name == "attention"]


def model_config(hf: Any) -> dict[str, Any]:
    """ModelConfig fields of a transformers BambaConfig."""
    mamba2.check_mixer(hf, bias="mamba_proj_bias")
    bias = bool(hf.attention_bias)
    llama._require(hf, "mlp_bias", bool(hf.mlp_bias) == bias, f"equal to attention_bias={bias}")
    if hf.mamba_n_heads * hf.mamba_d_head != hf.mamba_expand * hf.hidden_size:
        raise ConfigError(
            "config.json", "mamba_d_head", hf.mamba_d_head,
            "mamba_n_heads x mamba_d_head must equal mamba_expand x hidden_size", "import a consistent Bamba config",
        )  # fmt: skip
    kinds = list(hf.layers_block_type)
    pattern = ["attention" if kind == "full_attention" else "mamba2" for kind in kinds]
    params = dict(hf.rope_parameters or {})
    llama._require(
        hf, "rope_parameters.rope_type", params.get("rope_type", "default") == "default", "default"
    )
    fraction = float(params.get("partial_rotary_factor", ROPE_FRACTION))
    llama._require(hf, "partial_rotary_factor", fraction == ROPE_FRACTION, str(ROPE_FRACTION))
    heads = hf.num_attention_heads
    names = ("mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups", "mamba_d_conv",
             "mamba_conv_bias", "mamba_chunk_size")  # fmt: skip
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "d_model": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": heads,
        "kv_heads": hf.num_key_value_heads or heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        "ffn_hidden": hf.intermediate_size,
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": hf.rms_norm_eps,
        "bias": bias,
        "position": "rope",
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "rope_fraction": fraction,
        "max_seq_len": hf.max_position_embeddings,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "softmax_scale": "inv_sqrt_dk",
        "layers": LayersConfig(pattern=layer_period(pattern), feed_forward=True),
        "mamba2": mamba2.mamba2_section(hf, names),
    }
