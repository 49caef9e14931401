"""megatron-core model arguments <-> Loom's ModelConfig.

The arguments live in a YAML file (`megatron_config.yaml`) with three sections, each passed as keyword arguments:

    transformer_config:  TransformerConfig(**...), except activation_func, written by name (silu, gelu, relu)
    gpt_model:           GPTModel(config, spec, **...): vocab_size, max_sequence_length, position_embedding_type...
    layer_spec:          get_gpt_layer_local_spec(**...): normalization, num_experts, qk_layernorm

`loom convert --to megatron` writes it; `--from megatron` reads it (a megatron-core torch_dist checkpoint holds
no model arguments). Keys left out take megatron-core 0.16.1's defaults; keys this module does not know (parallel
sizes, precision, fusions) do not change the weights' meaning and are ignored; the keys in `REFUSED` must keep
their default, because Loom's model has no counterpart for them. Without the file, the arguments of a
Megatron-LM checkpoint are read from its common.pt (common.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, MoEConfig

FILE = "megatron_config.yaml"
SECTIONS = ("transformer_config", "gpt_model", "layer_spec")
# megatron-core 0.16.1 defaults of every key read here (TransformerConfig / GPTModel)
TC_DEFAULTS: dict[str, Any] = {
    "num_query_groups": None, "kv_channels": None, "ffn_hidden_size": None, "normalization": "LayerNorm",
    "layernorm_epsilon": 1e-5, "gated_linear_unit": False, "activation_func": "gelu", "add_bias_linear": True,
    "add_qkv_bias": False, "qk_layernorm": False, "hidden_dropout": 0.1, "attention_dropout": 0.1,
    "init_method_std": 0.02, "rotary_interleaved": False, "softmax_scale": None, "num_moe_experts": None,
    "moe_router_topk": 2, "moe_ffn_hidden_size": None, "moe_shared_expert_intermediate_size": None,
    "moe_router_score_function": "softmax", "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None, "moe_layer_freq": 1, "moe_router_num_groups": None,
    "moe_router_group_topk": None, "moe_router_enable_expert_bias": False, "moe_router_bias_update_rate": 1e-3,
    "moe_aux_loss_coeff": 0.0, "moe_z_loss_coeff": None, "moe_router_load_balancing_type": "aux_loss",
    "moe_input_jitter_eps": None,
}  # fmt: skip
GPT_DEFAULTS: dict[str, Any] = {
    "position_embedding_type": "learned_absolute", "rotary_base": 10000, "rotary_percent": 1.0,
    "seq_len_interpolation_factor": None, "rope_scaling": False, "rope_scaling_factor": 8.0,
    "share_embeddings_and_output_weights": False,
}  # fmt: skip
# TransformerConfig / GPTModel keys whose non-default values Loom cannot represent
REFUSED: dict[str, Any] = {
    "multi_latent_attention": False, "softmax_type": "vanilla", "attention_output_gate": False,
    "apply_residual_connection_post_layernorm": False, "layernorm_zero_centered_gamma": False,
    "qk_l2_norm": False, "moe_shared_expert_gate": False, "apply_query_key_layer_scaling": False,
    "mtp_num_layers": None, "window_size": None, "heterogeneous_block_specs": False,
    "experimental_attention_variant": None, "rotary_percent": 1.0,
}  # fmt: skip
MLA_GAP = (
    "megatron-core 0.16.1 builds MLASelfAttention only with Transformer Engine's attention: its local spec's "
    "DotProductAttention takes no k_channels / v_channels (TypeError on CPU), so Loom's megatron mapping has no "
    "MLA (no CPU reference to verify one against)"
)
_REFUSED_WHY = {
    "multi_latent_attention": (MLA_GAP, "convert the model through its Hugging Face DeepSeek-V3 checkpoint "
                               "(loom convert --from hf)"),
    "softmax_type": ("Loom's attention sinks (gpt-oss) are not mapped to megatron-core's learnable softmax yet",
                     "convert the model through its Hugging Face gpt-oss checkpoint (loom convert --from hf)"),
}  # fmt: skip
_ACTIVATIONS = {
    (True, "silu"): "swiglu",
    (True, "gelu"): "geglu",
    (False, "gelu"): "gelu",
    (False, "relu"): "relu",
}
_NORMS = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}
_POSITIONS = {"rope": "rope", "learned_absolute": "learned", "none": "none"}
_BALANCING = {"aux_loss": "micro_batch", "seq_aux_loss": "sequence", "global_aux_loss": "global_batch"}


def _refuse(key: str, value: Any, rule: str, fix: str) -> ConfigError:
    return ConfigError(FILE, key, value, rule, fix)


def read_args(path: str | Path) -> dict[str, dict[str, Any]]:
    """The three sections of a megatron_config.yaml (ConfigError if missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "command line", "--megatron-config", str(path), "does not exist",
            "write the TransformerConfig / GPTModel arguments of the checkpoint as YAML (docs/megatron.md)",
        )  # fmt: skip
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - set(SECTIONS)) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise ConfigError(str(path), unknown[0], data.get(unknown[0]) if isinstance(data, dict) else data,
                          f"is not a section; the file has {', '.join(SECTIONS)}", "remove or rename it")  # fmt: skip
    return {s: dict(data.get(s) or {}) for s in SECTIONS}


# ----------------------------------------------------------------------------------------------------- import


def model_config(args: dict[str, dict[str, Any]]) -> ModelConfig:
    """The Loom ModelConfig of megatron-core arguments; ConfigError naming the first key Loom cannot represent."""
    tc = TC_DEFAULTS | args["transformer_config"]
    gpt = GPT_DEFAULTS | args["gpt_model"]
    for key, default in REFUSED.items():
        value = {**args["transformer_config"], **args["gpt_model"]}.get(key, default)
        if value != default:
            rule, fix = _REFUSED_WHY.get(
                key, ("has no counterpart in Loom's model", f"convert a model with {key}: {default}")
            )
            raise _refuse(key, value, rule, fix)
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if tc.get(key) is None:
            raise _refuse(f"transformer_config.{key}", None, "is required", "add it")
    for key in ("vocab_size", "max_sequence_length"):
        if gpt.get(key) is None:
            raise _refuse(f"gpt_model.{key}", None, "is required", "add it")
    cfg = ModelConfig(**_dense_fields(tc, gpt), moe=_moe(tc) if tc["num_moe_experts"] else None)
    try:
        cfg.validate()
    except ConfigError as error:
        raise ConfigError(FILE, error.key, error.value, error.rule, error.fix) from None
    return cfg


def _dense_fields(tc: dict[str, Any], gpt: dict[str, Any]) -> dict[str, Any]:
    mlp = _ACTIVATIONS.get((bool(tc["gated_linear_unit"]), tc["activation_func"]))
    if mlp is None:
        raise _refuse("transformer_config.activation_func", tc["activation_func"],
                      f"with gated_linear_unit={tc['gated_linear_unit']} has no Loom mlp type",
                      "use silu/gelu with gated_linear_unit, or gelu/relu without")  # fmt: skip
    return {
        "family": "decoder", "vocab_size": gpt["vocab_size"], "max_seq_len": gpt["max_sequence_length"],
        "d_model": tc["hidden_size"], "n_layers": tc["num_layers"], "n_heads": tc["num_attention_heads"],
        "kv_heads": tc["num_query_groups"], "head_dim": tc["kv_channels"],
        "ffn_hidden": tc["ffn_hidden_size"] or 4 * tc["hidden_size"], "mlp": mlp,
        "norm": _choice("transformer_config.normalization", tc["normalization"], _NORMS),
        "norm_eps": float(tc["layernorm_epsilon"]), "qk_norm": bool(tc["qk_layernorm"]), "bias": _bias(tc),
        "dropout": float(tc["hidden_dropout"]), "attention_dropout": float(tc["attention_dropout"]),
        "init_std": float(tc["init_method_std"]),
        "tie_embeddings": bool(gpt["share_embeddings_and_output_weights"]),
        "softmax_scale": "inv_sqrt_dk" if tc["softmax_scale"] is None else float(tc["softmax_scale"]),
        **_positions(gpt),
    }  # fmt: skip


def _choice(key: str, value: Any, table: dict[str, str]) -> str:
    if value not in table:
        raise _refuse(key, value, "has no counterpart in Loom", f"use one of: {', '.join(table)}")
    return table[value]


def _bias(tc: dict[str, Any]) -> bool:
    if tc["add_qkv_bias"] and not tc["add_bias_linear"]:
        raise _refuse("transformer_config.add_qkv_bias", True, "Loom has biases in all linear layers or in none",
                      "convert a model with add_qkv_bias equal to add_bias_linear")  # fmt: skip
    if tc["add_bias_linear"] and tc["num_moe_experts"]:
        raise _refuse("transformer_config.add_bias_linear", True, "Loom's experts have no biases",
                      "convert an MoE model saved with add_bias_linear: false")  # fmt: skip
    return bool(tc["add_bias_linear"])


def _positions(gpt: dict[str, Any]) -> dict[str, Any]:
    position = _choice("gpt_model.position_embedding_type", gpt["position_embedding_type"], _POSITIONS)
    fields: dict[str, Any] = {"position": position, "rope_theta": float(gpt["rotary_base"])}
    if gpt["rope_scaling"]:
        # megatron-core fixes low/high frequency factors 1 and 4 and original length 8192: Loom's defaults
        fields |= {"rope_scaling": "llama3", "rope_scaling_factor": float(gpt["rope_scaling_factor"])}
    elif gpt["seq_len_interpolation_factor"]:
        fields |= {
            "rope_scaling": "linear",
            "rope_scaling_factor": float(gpt["seq_len_interpolation_factor"]),
        }
    return fields


def _moe(tc: dict[str, Any]) -> MoEConfig:
    experts, top_k = tc["num_moe_experts"], tc["moe_router_topk"]
    hidden = tc["moe_ffn_hidden_size"] or tc["ffn_hidden_size"] or 4 * tc["hidden_size"]
    score = _choice("transformer_config.moe_router_score_function", tc["moe_router_score_function"],
                    {"softmax": "softmax", "sigmoid": "sigmoid"})  # fmt: skip
    if tc["moe_router_enable_expert_bias"] and score == "softmax":
        raise _refuse("transformer_config.moe_router_enable_expert_bias", True,
                      "megatron-core ignores the expert bias with softmax scores, Loom would not",
                      "convert with moe_router_score_function: sigmoid or without the bias")  # fmt: skip
    return MoEConfig(
        n_experts=experts, top_k=top_k, expert_hidden=hidden, router=score,
        # softmax: top-k of the logits then softmax over them = renormalised; pre-softmax: raw probabilities.
        # sigmoid: megatron divides by the sum whenever top_k > 1
        renormalize=not tc["moe_router_pre_softmax"] if score == "softmax" else top_k > 1,
        route_scale=float(tc["moe_router_topk_scaling_factor"] or 1.0),
        n_shared_experts=_shared(tc, hidden), **_placement(tc), **_groups(tc, score),
        bias_update_rate=float(tc["moe_router_bias_update_rate"]) if tc["moe_router_enable_expert_bias"] else 0.0,
        aux_loss=float(tc["moe_aux_loss_coeff"]), z_loss=float(tc["moe_z_loss_coeff"] or 0.0),
        aux_loss_scope=_choice("transformer_config.moe_router_load_balancing_type",  # type: ignore[arg-type]
                               tc["moe_router_load_balancing_type"], _BALANCING),
        jitter=float(tc["moe_input_jitter_eps"] or 0.0),
    )  # fmt: skip


def _shared(tc: dict[str, Any], hidden: int) -> int:
    width = tc["moe_shared_expert_intermediate_size"]
    if not width:
        return 0
    if width % hidden:
        raise _refuse("transformer_config.moe_shared_expert_intermediate_size", width,
                      f"Loom's shared experts are a multiple of the expert width {hidden}",
                      "convert a model whose shared width is n x moe_ffn_hidden_size")  # fmt: skip
    return width // hidden


def _placement(tc: dict[str, Any]) -> dict[str, int]:
    """moe_layer_freq (int k: layers 0, k, 2k...; list: 1 = MoE) -> Loom's first_dense / every."""
    freq, n = tc["moe_layer_freq"], tc["num_layers"]
    pattern = [int(i % freq == 0) for i in range(n)] if isinstance(freq, int) else list(freq)
    sparse = [i for i, flag in enumerate(pattern) if flag]
    if len(pattern) != n or not sparse:
        raise _refuse("transformer_config.moe_layer_freq", freq, f"must mark some of the {n} layers as MoE",
                      "fix moe_layer_freq")  # fmt: skip
    first = sparse[0]
    every = sparse[1] - first if len(sparse) > 1 else n - first
    if sparse != list(range(first, n, every)):
        raise _refuse("transformer_config.moe_layer_freq", freq,
                      "Loom's MoE layers are first_dense, first_dense + every, ... up to the last layer",
                      "convert a model whose MoE layers are evenly spaced")  # fmt: skip
    return {"first_dense": first, "every": every}


def _groups(tc: dict[str, Any], score: str) -> dict[str, int]:
    groups, group_topk = tc["moe_router_num_groups"], tc["moe_router_group_topk"]
    if not group_topk:
        return {}
    # megatron scores a group by its top (top_k / group_topk) experts, Loom by its top 2, both on the scores
    if tc["moe_router_topk"] // group_topk != 2 or (score == "softmax" and not tc["moe_router_pre_softmax"]):
        raise _refuse("transformer_config.moe_router_group_topk", group_topk,
                      "Loom ranks groups by their two best expert scores (DeepSeek-V3)",
                      "convert a model with moe_router_topk = 2 x group_topk and sigmoid or pre-softmax scores")  # fmt: skip
    return {"n_groups": groups, "topk_groups": group_topk}


# ----------------------------------------------------------------------------------------------------- export

# Loom fields whose non-default values megatron-core's GPT model cannot represent: field -> (default, why)
_NOT_EXPORTABLE: dict[str, tuple[Any, str]] = {
    "family": ("decoder", "megatron-core's GPTModel is a causal decoder"),
    "norm_position": ("pre", "GPTModel normalises before each branch"),
    "qk_norm_scope": ("head", "megatron-core's qk_layernorm normalises each head"),
    "sliding_window": (None, "the local layer spec has no sliding-window attention"),
    "full_attention_layers": (None, "the local layer spec has no sliding-window attention"),
    "embedding_norm": (False, "GPTModel has no embedding norm"),
    "type_vocab_size": (0, "GPTModel has no token-type embeddings"),
    "mlm_head_transform": (False, "GPTModel has no masked-LM head"),
    "output_bias": (False, "GPTModel's output layer has no bias"),
    "attention_temperature": (1.0, "megatron-core has no attention temperature"),
    "learned_temperature": (False, "megatron-core has no attention temperature"),
    "soft_distance_bias": (False, "megatron-core has no distance bias"),
    "gelu_approximate": ("none", "megatron-core's gelu is the erf form"),
    "rope_low_freq_factor": (1.0, "megatron-core fixes the llama3 RoPE factors (1, 4, 8192)"),
    "rope_high_freq_factor": (4.0, "megatron-core fixes the llama3 RoPE factors (1, 4, 8192)"),
    "rope_original_max_seq_len": (8192, "megatron-core fixes the llama3 RoPE factors (1, 4, 8192)"),
    "bias_scope": ("all", "Loom's megatron mapping has biases in all linear layers or in none"),
    "norm_weight_offset": (False, "not mapped to megatron-core's zero-centred gamma"),
    "sandwich_norm": (False, "GPTModel has no norms after the branches"),
    "embedding_scale": ("none", "GPTModel does not scale its embeddings"),
    "final_logit_softcap": (None, "GPTModel does not soft-cap its logits"),
    "attention_softcap": (None, "megatron-core's local attention does not soft-cap its scores"),
    "attention_sinks": (False, "Loom's megatron mapping has no attention sinks (gpt-oss) yet"),
}


_MIXER_GAP = (
    "Loom's megatron mapping writes SelfAttention layers only: Gated DeltaNet and Mamba-2 blocks have no "
    "megatron-core GPT layer"
)


def _not_exportable(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(None, key, value, f"cannot be written for megatron-core: {why}",
                       "export to megatron only models megatron-core can represent (docs/megatron.md)")  # fmt: skip


def megatron_args(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """The megatron_config.yaml sections for cfg; ConfigError naming the first field megatron cannot hold."""
    for name, (default, why) in _NOT_EXPORTABLE.items():
        if getattr(cfg, name) != default:
            raise _not_exportable(f"model.{name}", getattr(cfg, name), why)
    if set(cfg.mixers) != {"attention"}:
        why = MLA_GAP if "mla" in cfg.mixers else _MIXER_GAP
        raise _not_exportable("model.layers.pattern", cfg.layers.pattern if cfg.layers else None, why)
    if cfg.mtp is not None:
        raise _not_exportable("model.mtp", cfg.mtp.depth, "Loom's megatron mapping has no MTP layers yet")
    position = {v: k for k, v in _POSITIONS.items()}.get(cfg.position)
    if position is None:
        raise _not_exportable("model.position", cfg.position, "GPTModel has rope, learned_absolute or none")
    if cfg.bias and cfg.moe is not None:
        raise _not_exportable("model.bias", True, "Loom's experts have no biases but megatron's would")
    act = {
        "swiglu": (True, "silu"),
        "geglu": (True, "gelu"),
        "gelu": (False, "gelu"),
        "relu": (False, "relu"),
    }
    if cfg.mlp not in act:
        raise _not_exportable(
            "model.mlp", cfg.mlp, "Loom's megatron mapping has no clamped SwiGLU (gpt-oss) yet"
        )
    gated, activation = act[cfg.mlp]
    tc = {
        "num_layers": cfg.n_layers, "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_heads,
        "num_query_groups": cfg.resolved_kv_heads, "kv_channels": cfg.resolved_head_dim,
        "ffn_hidden_size": cfg.ffn_hidden, "normalization": {v: k for k, v in _NORMS.items()}[cfg.norm],
        "layernorm_epsilon": cfg.norm_eps, "gated_linear_unit": gated, "activation_func": activation,
        "add_bias_linear": cfg.bias, "add_qkv_bias": cfg.bias, "qk_layernorm": cfg.qk_norm,
        "hidden_dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout, "init_method_std": cfg.init_std,
        "rotary_interleaved": False,
    }  # fmt: skip
    if cfg.softmax_scale != "inv_sqrt_dk":
        tc["softmax_scale"] = 1.0 if cfg.softmax_scale == "none" else float(cfg.softmax_scale)
    if cfg.moe is not None:
        tc |= _moe_args(cfg)
    spec = {"normalization": tc["normalization"], "qk_layernorm": cfg.qk_norm}
    if cfg.moe is not None:
        spec["num_experts"] = cfg.moe.n_experts
    return {"transformer_config": tc, "gpt_model": _gpt_args(cfg, position), "layer_spec": spec}


def _gpt_args(cfg: ModelConfig, position: str) -> dict[str, Any]:
    gpt = {
        "vocab_size": cfg.vocab_size, "max_sequence_length": cfg.max_seq_len,
        "position_embedding_type": position, "rotary_base": cfg.rope_theta, "rotary_percent": 1.0,
        "share_embeddings_and_output_weights": cfg.tie_embeddings,
    }  # fmt: skip
    if cfg.rope_scaling == "llama3":
        gpt |= {"rope_scaling": True, "rope_scaling_factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "linear":
        gpt["seq_len_interpolation_factor"] = cfg.rope_scaling_factor
    return gpt


def _moe_args(cfg: ModelConfig) -> dict[str, Any]:
    """MoEConfig -> TransformerConfig moe_* fields (capacity_factor is a training drop policy: not written)."""
    m = cfg.moe
    assert m is not None
    if m.router == "softmax" and m.bias_update_rate > 0:
        raise _not_exportable("model.moe.bias_update_rate", m.bias_update_rate,
                              "megatron-core uses the expert bias only with sigmoid scores")  # fmt: skip
    if m.router == "sigmoid" and m.renormalize != (m.top_k > 1):
        raise _not_exportable("model.moe.renormalize", m.renormalize,
                              "megatron-core renormalises sigmoid weights exactly when top_k > 1")  # fmt: skip
    if m.n_groups > 1 and (m.top_k != 2 * m.topk_groups or (m.router == "softmax" and m.renormalize)):
        raise _not_exportable("model.moe.n_groups", m.n_groups,
                              "megatron ranks groups by top_k / group_topk experts (Loom by 2), on scores")  # fmt: skip
    if m.expert_bias and m.bias_update_rate == 0:
        raise _not_exportable("model.moe.expert_bias", True,
                              "Loom's megatron mapping carries the expert bias only with bias_update_rate > 0")  # fmt: skip
    if m.shared_expert_gate:
        raise _not_exportable("model.moe.shared_expert_gate", True,
                              "Loom's megatron mapping has no shared-expert gate")  # fmt: skip
    layers = set(cfg.moe_layers)
    freq: int | list[int] = (
        1 if len(layers) == cfg.n_layers else [int(i in layers) for i in range(cfg.n_layers)]
    )
    args = {
        "num_moe_experts": m.n_experts, "moe_router_topk": m.top_k,
        "moe_ffn_hidden_size": m.resolved_expert_hidden(cfg.ffn_hidden), "moe_layer_freq": freq,
        "moe_router_score_function": m.router, "moe_router_pre_softmax": m.router == "softmax" and not m.renormalize,
        "moe_router_topk_scaling_factor": m.route_scale if m.route_scale != 1.0 else None,
        "moe_aux_loss_coeff": m.aux_loss, "moe_z_loss_coeff": m.z_loss or None,
        "moe_router_load_balancing_type": {v: k for k, v in _BALANCING.items()}[m.aux_loss_scope],
        "moe_input_jitter_eps": m.jitter or None,
    }  # fmt: skip
    if m.n_shared_experts:
        args["moe_shared_expert_intermediate_size"] = m.resolved_shared_hidden(cfg.ffn_hidden)
    if m.n_groups > 1:
        args |= {"moe_router_num_groups": m.n_groups, "moe_router_group_topk": m.topk_groups}
    if m.bias_update_rate > 0:
        args |= {"moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": m.bias_update_rate}
    return args


def write_args(args: dict[str, dict[str, Any]], path: Path) -> None:
    header = "# megatron-core GPTModel arguments (loom convert --to megatron; docs/megatron.md)\n"
    path.write_text(header + yaml.safe_dump(args, sort_keys=False))
