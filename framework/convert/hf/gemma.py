"""Gemma (GemmaForCausalLM): Llama's weights and names, with a GeGLU (tanh GELU) MLP, RMSNorm gains stored as
w in x_hat * (1 + w), token embeddings multiplied by sqrt(d_model) and, usually, a tied head."""

from __future__ import annotations

from typing import Any

from framework.convert.hf import llama

renames = llama.renames
optional = llama.optional

# ModelConfig fields every Gemma has and Llama's mapping does not set
GEMMA_FIELDS = {
    "mlp": "geglu",
    "gelu_approximate": "tanh",
    "norm_weight_offset": True,
    "embedding_scale": "sqrt_d_model",
}


def model_config(hf: Any) -> dict[str, Any]:
    """ModelConfig fields of a GemmaConfig (GemmaConfig itself maps the legacy hidden_act "gelu" to the tanh
    form, as the released checkpoints mean it)."""
    return common_fields(hf, getattr(hf, "hidden_act", None), "hidden_act")


def common_fields(hf: Any, activation: str | None, key: str) -> dict[str, Any]:
    """Gemma and Gemma 2's shared fields, after checking what Loom cannot express: another activation, attention
    biases (Loom's one bias switch would add MLP biases Gemma has not), bidirectional attention."""
    llama._require(hf, key, activation == "gelu_pytorch_tanh", "gelu_pytorch_tanh (GeGLU with tanh GELU)")
    llama._require(hf, "attention_bias", not getattr(hf, "attention_bias", False), "false")
    bidirectional = bool(getattr(hf, "use_bidirectional_attention", False))
    llama._require(hf, "use_bidirectional_attention", not bidirectional, "false or null (causal attention)")
    heads = hf.num_attention_heads
    return (
        {
            "family": "decoder",
            "vocab_size": hf.vocab_size,
            "d_model": hf.hidden_size,
            "n_layers": hf.num_hidden_layers,
            "n_heads": heads,
            "kv_heads": getattr(hf, "num_key_value_heads", None) or heads,
            "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            "ffn_hidden": hf.intermediate_size,
            "norm": "rmsnorm",
            "norm_eps": hf.rms_norm_eps,
            "position": "rope",
            "max_seq_len": hf.max_position_embeddings,
            "tie_embeddings": bool(hf.tie_word_embeddings),
            "softmax_scale": "inv_sqrt_dk",
        }
        | GEMMA_FIELDS
        | llama.rope_fields(hf)
    )
