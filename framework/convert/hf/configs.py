"""Which Hugging Face `transformers` family represents a Loom model config, and that family's config.

Used as the independent check of parameter counts now, and by `loom convert --to hf` later. A Loom architecture
that no family represents is refused with the fields that make it so.
"""

from __future__ import annotations

from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, ModelConfig


def hf_family(cfg: ModelConfig) -> str:
    """llama | mistral | qwen3 | qwen2 | phi3 | gpt2 | bloom | bert | t5 | mixtral | qwen3_moe | qwen3_next |
    glm4_moe | deepseek_v3 | gpt_oss | gemma | gemma2 | gemma3_text | olmo2 | olmo3 | mamba2 | bamba,
    from the architecture fields (phi3 only when model.hf_architecture names it: its weights are Llama's).
    Gated DeltaNet blocks or a gated attention output are Qwen3-Next's alone; a sigmoid router with partial
    rotary or q/k/v-only biases is GLM-4.5's (DeepSeek-V3 routing on full-rotary, bias-free attention is not);
    attention sinks, the clamped SwiGLU or biased experts are gpt-oss's."""
    if cfg.family == "decoder" and ("gdn" in cfg.mixers or cfg.attention_gate):
        return "qwen3_next"
    if cfg.family == "decoder" and "mla" in cfg.mixers:  # Multi-head Latent Attention: DeepSeek-V3 (Kimi-K2)
        return "deepseek_v3"
    if _is_glm4_moe(cfg):
        return "glm4_moe"
    if cfg.family == "decoder" and _is_gpt_oss(cfg):
        return "gpt_oss"
    if "mamba2" in cfg.mixers:  # Mamba-2 blocks alone (no MLP), or a hybrid with an MLP in every block
        return "mamba2" if cfg.layers is not None and not cfg.layers.feed_forward else "bamba"
    if cfg.moe is not None and cfg.family == "decoder":
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.family == "encoder":
        return "bert"
    if cfg.family == "encoder_decoder":
        return "t5"
    if cfg.hf_architecture != "auto":
        return cfg.hf_architecture
    if cfg.norm_position == "reordered":  # OLMo 2; OLMo 3 adds per-layer sliding windows
        return "olmo3" if cfg.sliding_window is not None else "olmo2"
    if cfg.sandwich_norm or cfg.final_logit_softcap is not None or cfg.attention_softcap is not None:
        # Gemma 3 adds QK-norm and local layers with their own RoPE (model.layers' attention_local)
        return "gemma3_text" if cfg.qk_norm or "attention_local" in cfg.mixers else "gemma2"
    if cfg.embedding_scale != "none" or cfg.norm_weight_offset:
        return "gemma"
    if cfg.position == "alibi":
        return "bloom"
    if cfg.position == "learned":
        return "gpt2"
    if cfg.bias_scope == "qkv":
        return "qwen2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def _is_glm4_moe(cfg: ModelConfig) -> bool:
    """GLM-4.5's distinguishing fields: sigmoid routing with partial RoPE or q/k/v biases, standard attention
    blocks (MLA blocks are DeepSeek-V3's)."""
    glm_attention = cfg.rope_fraction < 1 or (cfg.bias and cfg.bias_scope == "qkv")
    routed = cfg.moe is not None and cfg.moe.router == "sigmoid"
    return cfg.family == "decoder" and routed and glm_attention and "mla" not in cfg.mixers


def _is_gpt_oss(cfg: ModelConfig) -> bool:
    """gpt-oss's distinguishing fields: attention sinks, the clamped SwiGLU, or biased experts / router."""
    biased = cfg.moe is not None and (cfg.moe.expert_linear_bias or cfg.moe.router_bias)
    return cfg.attention_sinks or cfg.mlp == "clamped_swiglu" or biased


# Fields each family fixes; a config that differs cannot be represented by it.
_REQUIRED: dict[str, dict[str, Any]] = {
    "llama": {
        "position": "rope",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "mlp": "swiglu",
        "qk_norm": False,
    },
    "mistral": {
        "position": "rope",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "mlp": "swiglu",
        "bias": False,
    },
    "qwen3": {"position": "rope", "norm": "rmsnorm", "norm_position": "pre", "mlp": "swiglu", "bias": False},
    "gpt2": {
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "pre",
        "mlp": "gelu",
        "bias": True,
        "qk_norm": False,
    },
    "bloom": {
        "norm": "layernorm",
        "norm_position": "pre",
        "mlp": "gelu",
        "bias": True,
        "embedding_norm": True,
    },
    "bert": {
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "post",
        "mlp": "gelu",
        "bias": True,
    },
    "t5": {"position": "relative_bias", "norm": "rmsnorm", "norm_position": "pre", "bias": False},
}
# Gemma: GeGLU with tanh GELU, (1 + w) RMSNorm gains, embeddings times sqrt(d_model), no biases in the MLP (and
# Loom's one bias switch covers both); Gemma 2 adds the sandwich norms
_REQUIRED["gemma"] = {
    "position": "rope",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "mlp": "geglu",
    "gelu_approximate": "tanh",
    "qk_norm": False,
    "bias": False,
    "norm_weight_offset": True,
    "embedding_scale": "sqrt_d_model",
    "sandwich_norm": False,
}
_REQUIRED["gemma2"] = _REQUIRED["gemma"] | {"sandwich_norm": True}
_REQUIRED["gemma3_text"] = _REQUIRED["gemma2"] | {"qk_norm": True}  # per head (qk_norm_scope head)
# OLMo 2: Llama's layers with x + norm(f(x)) blocks and QK-norm over the whole projections; no biases
_REQUIRED["olmo2"] = _REQUIRED["llama"] | {"norm_position": "reordered", "qk_norm": True,
                                          "qk_norm_scope": "projection", "bias": False}  # fmt: skip
_REQUIRED["olmo3"] = _REQUIRED["olmo2"]
# transformers' Mixtral has no attention or MLP bias switch (Llama has one)
_REQUIRED["mixtral"] = _REQUIRED["llama"] | {"bias": False}
_REQUIRED["qwen3_moe"] = _REQUIRED["qwen3"]
# Qwen3-Next: per-head QK-norm, every RMSNorm but the Gated DeltaNet's zero-centred ((1 + w)), gated attention
_REQUIRED["qwen3_next"] = _REQUIRED["qwen3"] | {"qk_norm": True, "qk_norm_scope": "head",
                                                "norm_weight_offset": True, "attention_gate": True}  # fmt: skip
# Qwen2: Llama with biases on q/k/v only; Phi-3: Llama without biases, chosen by name (hf_architecture)
_REQUIRED["qwen2"] = _REQUIRED["llama"] | {"bias": True, "bias_scope": "qkv"}
# GLM-4.5: Llama's layers with optional per-head QK-norm (use_qk_norm), q/k/v biases or none (attention_bias;
# never on o_proj or the MLPs: _glm4_moe_rules), any partial rotary (partial_rotary_factor), plain RoPE
_REQUIRED["glm4_moe"] = {k: v for k, v in _REQUIRED["llama"].items() if k != "qk_norm"} | {
    "rope_scaling": "none"
}
# DeepSeek-V3: MLA blocks (their widths model.mla's) with GLM-4.5's MoE layers; no biases in the real checkpoints'
# layout Loom maps (attention_bias false), full-width RoPE keys (no partial rotary), default or yarn RoPE scaling
_REQUIRED["deepseek_v3"] = {k: v for k, v in _REQUIRED["llama"].items() if k != "qk_norm"} | {"bias": False}
_REQUIRED["phi3"] = _REQUIRED["llama"] | {"bias": False, "hf_architecture": "phi3"}
# gpt-oss: Llama's layers with sinks in every attention, the clamped SwiGLU, one attention_bias for q/k/v/o
_REQUIRED["gpt_oss"] = _REQUIRED["llama"] | {"mlp": "clamped_swiglu", "attention_sinks": True}
# Mamba-2: RMSNorm pre-norm blocks around the mixer alone (no attention, no MLP, no biases); Bamba: Llama's
# attention and MLP beside Mamba-2 mixers, its RoPE hard-coded to half of each head (partial_rotary_factor 0.5)
_REQUIRED["mamba2"] = {"norm": "rmsnorm", "norm_position": "pre", "qk_norm": False, "bias": False}
_REQUIRED["bamba"] = _REQUIRED["llama"] | {"rope_fraction": 0.5}
# MoE fields each MoE family fixes: both route with a softmax over all experts and top-k, have no shared experts,
# no expert groups, no selection bias and no weight scale, and are dropless (transformers runs every chosen
# expert; Loom's capacity dropping applies in eval too, so a capped model would compute something else).
# Qwen3-MoE places dense layers anywhere (mlp_only_layers); Mixtral has none and always renormalises top-k.
_MOE_REQUIRED: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "router": "softmax",
        "n_shared_experts": 0,
        "n_groups": 1,
        "bias_update_rate": 0.0,
        "route_scale": 1.0,
        "capacity_factor": None,
    },
    "mixtral": {"first_dense": 0, "every": 1, "renormalize": True},
}
_MOE_REQUIRED["mixtral"] |= _MOE_REQUIRED["qwen3_moe"]
_MOE_REQUIRED["qwen3_moe"] |= {"shared_expert_gate": False}
_MOE_REQUIRED["mixtral"] |= {"shared_expert_gate": False}
# Qwen3-Next: Qwen3-MoE's routing plus exactly one shared expert (any width) behind a sigmoid gate
_MOE_REQUIRED["qwen3_next"] = _MOE_REQUIRED["qwen3_moe"] | {"n_shared_experts": 1, "shared_expert_gate": True}
# GLM-4.5: sigmoid scores, any groups / renormalisation / scale, a selection bias (e_score_correction_bias; any
# update rate, a training rule), ungated shared experts n_shared_experts x moe_intermediate_size wide, the first
# first_k_dense_replace layers dense and every later one sparse; no jitter, no router or expert biases, dropless
_MOE_REQUIRED["glm4_moe"] = {"router": "sigmoid", "shared_expert_gate": False, "shared_expert_hidden": None,
                             "every": 1, "jitter": 0.0, "capacity_factor": None, "router_bias": False,
                             "expert_linear_bias": False}  # fmt: skip
_MOE_REQUIRED["deepseek_v3"] = _MOE_REQUIRED["glm4_moe"]  # the same DeepSeek routing and shared experts
# gpt-oss: every layer sparse, softmax over the top-k logits (renormalised), router and expert biases, no shared
# experts, groups, selection bias or scale; dropless, no jitter
_MOE_REQUIRED["gpt_oss"] = _MOE_REQUIRED["mixtral"] | {
    "router_bias": True, "expert_linear_bias": True, "expert_bias": False, "jitter": 0.0,
}  # fmt: skip


def _moe_rules(cfg: ModelConfig, family: str) -> list[str]:
    """MoE fields `family` cannot represent (none for dense families, which refuse model.moe themselves)."""
    if cfg.moe is None or family not in _MOE_REQUIRED:
        return []
    wrong = [
        f"model.moe.{k}={getattr(cfg.moe, k)!r} (needs {v!r})"
        for k, v in _MOE_REQUIRED[family].items()
        if getattr(cfg.moe, k) != v
    ]
    return wrong + (_glm4_moe_rules(cfg) if family in ("glm4_moe", "deepseek_v3") else [])


def _gpt_oss_rules(cfg: ModelConfig) -> list[str]:
    """gpt-oss is MoE in every layer, with one RoPE (default or YaRN) for its sliding and full layers."""
    wrong = [] if cfg.moe is not None else ["model.moe=None (needs an MoE in every layer: gpt-oss is sparse)"]
    if cfg.rope_scaling not in ("none", "yarn"):
        wrong.append(f"model.rope_scaling={cfg.rope_scaling!r} (needs 'none' or 'yarn')")
    if cfg.layers is not None and cfg.layers.local_rope_theta is not None:
        wrong.append(f"model.layers.local_rope_theta={cfg.layers.local_rope_theta} (needs null: one RoPE)")
    return wrong


def _glm4_moe_rules(cfg: ModelConfig) -> list[str]:
    """GLM-4.5 always builds shared experts, scores a group by its two best experts (torch.topk(2): at least two
    per group) and has no bias outside q/k/v."""
    moe, wrong = cfg.moe, []
    assert moe is not None
    if moe.n_shared_experts < 1:
        wrong.append("model.moe.n_shared_experts=0 (needs >= 1: every GLM-4.5 MoE layer has shared experts)")
    if moe.n_experts // moe.n_groups < 2:
        wrong.append(f"model.moe.n_groups={moe.n_groups} (needs at least 2 experts per group)")
    if cfg.dense_bias:
        wrong.append("model.bias_scope='all' (needs 'qkv': no bias on o_proj or the MLPs)")
    return wrong


_NEVER = {"learned_temperature": False, "soft_distance_bias": False, "attention_temperature": 1.0}
# Qwen3-Next's fields, which no other family has a tensor or switch for
_QWEN3_NEXT_ONLY = {"attention_gate": False, "rope_fraction": 1.0}
_PARTIAL_ROTARY = {"qwen3_next", "glm4_moe"}
"""Families with any partial_rotary_factor (Bamba's is fixed at 0.5 by its _REQUIRED entry)."""
# Defaults every family needs unless its _REQUIRED entry says otherwise (Qwen2's bias_scope, Phi-3's name).
_DEFAULTS = {"bias_scope": "all", "hf_architecture": "auto", "qk_norm_scope": "head"}
_FREE_DEFAULTS = {"glm4_moe": {"bias_scope"}}
"""Defaults a family does not fix: GLM-4.5 has q/k/v biases or none (bias_scope qkv, or bias false)."""


def check_representable(cfg: ModelConfig) -> str:
    """The HF family for `cfg`, or a ConfigError listing every field that family cannot represent."""
    family = hf_family(cfg)
    defaults = {k: v for k, v in _DEFAULTS.items() if k not in _FREE_DEFAULTS.get(family, ())}
    wrong = [
        f"model.{k}={getattr(cfg, k)!r} (needs {v!r})"
        for k, v in {**defaults, **_REQUIRED[family], **_NEVER}.items()
        if getattr(cfg, k) != v
    ]
    if family == "t5" and cfg.mlp not in ("relu", "geglu"):
        wrong.append(f"model.mlp={cfg.mlp!r} (needs 'relu' or 'geglu')")
    wrong += _derived_rules(cfg, family)
    wrong += _moe_rules(cfg, family)
    if wrong:
        raise ConfigError(
            None,
            "model",
            family,
            f"no Hugging Face family represents: {', '.join(wrong)}",
            "change those fields",
        )
    return family


# Weight-layout fields of the other families that these families have no tensor or switch for.
_ABSENT = {"embedding_norm": False, "mlm_head_transform": False, "output_bias": False, "type_vocab_size": 0}
# Gemma 2's fields beyond Gemma's, and Gemma's, which no other family has a tensor or switch for
_GEMMA2_ONLY = {"final_logit_softcap": None, "attention_softcap": None, "full_attention_layers": None}
_GEMMA_ONLY = {"norm_weight_offset": False, "sandwich_norm": False, "embedding_scale": "none"} | _GEMMA2_ONLY
_EXTRA: dict[str, dict[str, Any]] = {
    "llama": _ABSENT | {"softmax_scale": "inv_sqrt_dk"},
    "mistral": _ABSENT | {"softmax_scale": "inv_sqrt_dk"},
    # transformers' Qwen3 windows only some layers (layer_types); a uniform window is not what it computes
    "qwen3": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "bloom": _ABSENT | {"embedding_norm": True, "softmax_scale": "inv_sqrt_dk", "gelu_approximate": "tanh"},
    "bert": {
        "embedding_norm": True,
        "mlm_head_transform": True,
        "output_bias": True,
        "softmax_scale": "inv_sqrt_dk",
    },
    "t5": _ABSENT | {"softmax_scale": "none"},
    "mixtral": _ABSENT | {"softmax_scale": "inv_sqrt_dk"},
    "qwen3_moe": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "glm4_moe": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None, "attention_sinks": False},
    "deepseek_v3": _ABSENT
    | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None, "attention_sinks": False},
    # gpt-oss windows only its sliding layers (model.layers' attention_local)
    "gpt_oss": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "qwen3_next": _ABSENT
    | {
        "softmax_scale": "inv_sqrt_dk",
        "sliding_window": None,
        "embedding_scale": "none",
        "sandwich_norm": False,
    }
    | _GEMMA2_ONLY,  # fmt: skip
    "qwen2": _ABSENT | {"softmax_scale": "inv_sqrt_dk"},
    # Phi-3's RoPE is default or longrope (no linear or llama3 scaling); its window is uniform, as Loom's
    "phi3": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "rope_scaling": "none"},
    "gpt2": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "gemma": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None} | _GEMMA2_ONLY,
    "gemma2": _ABSENT,
    # Gemma 3's windows are its local layers' (model.layers.local_window), its global layers have none; its
    # attention never applies attn_logit_softcapping (transformers 5.24)
    "gemma3_text": _ABSENT
    | {"sliding_window": None, "full_attention_layers": None, "attention_softcap": None},
    "olmo2": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "olmo3": _ABSENT | {"softmax_scale": "inv_sqrt_dk"},
    "mamba2": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None},
    "bamba": _ABSENT | {"softmax_scale": "inv_sqrt_dk", "sliding_window": None, "rope_scaling": "none"},
}
_MIXERS = {"mamba2": {"mamba2"}, "bamba": {"mamba2", "attention"}}
"""The block mixers (model.layers.pattern) each Mamba family has a layer kind for."""
_MIXER_ONLY_BLOCKS = {"mamba2"}
"""Families whose blocks hold their mixer alone (no feed-forward); every other family has one per block."""
_LAYER_PATTERN = {"gemma2", "olmo3"}
"""Families whose transformers config has per-layer `layer_types`: Loom's full_attention_layers maps onto it."""


def _derived_rules(cfg: ModelConfig, family: str) -> list[str]:
    """Rules beyond fixed field values: head shapes the family hard-codes, MLP width, token types, gelu form."""
    only = {} if family.startswith("gemma") or family == "qwen3_next" else dict(_GEMMA_ONLY)
    if family != "qwen3_next":  # (Bamba's _REQUIRED rope_fraction 0.5 stands)
        free = set(_REQUIRED[family]) | ({"rope_fraction"} if family in _PARTIAL_ROTARY else set())
        only |= {k: v for k, v in _QWEN3_NEXT_ONLY.items() if k not in free}
    if family in _LAYER_PATTERN:
        only.pop("full_attention_layers", None)
    extra = _EXTRA.get(family, {}) | only
    wrong = [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in extra.items() if getattr(cfg, k) != v]
    if family in ("gemma2", "gemma3_text"):
        wrong += _gemma2_rules(cfg)
    wrong += _mixer_rules(cfg, family)
    if family in ("bloom", "bert", "t5", "gpt2") and cfg.resolved_kv_heads != cfg.n_heads:
        wrong.append(
            f"model.kv_heads={cfg.kv_heads!r} (needs n_heads={cfg.n_heads}: no grouped-query attention)"
        )
    if family in ("bloom", "bert", "gpt2") and cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
        wrong.append(f"model.head_dim={cfg.head_dim!r} (needs d_model / n_heads)")
    if family == "bloom" and cfg.ffn_hidden != 4 * cfg.d_model:
        wrong.append(f"model.ffn_hidden={cfg.ffn_hidden} (needs 4 * d_model = {4 * cfg.d_model})")
    if family == "bert" and cfg.type_vocab_size < 1:
        wrong.append("model.type_vocab_size=0 (needs >= 1: BERT always adds a token-type embedding)")
    if family == "t5" and cfg.mlp == "geglu" and cfg.gelu_approximate != "tanh":
        wrong.append(f"model.gelu_approximate={cfg.gelu_approximate!r} (needs 'tanh' for gated-gelu)")
    if getattr(cfg, "moe", None) is not None and family in _EXTRA and family not in _MOE_REQUIRED:
        wrong.append(f"model.moe (family {family} is dense)")
    if family in _MIXERS:
        wrong += _mamba_rules(cfg, family)
    if family == "gpt_oss":
        wrong += _gpt_oss_rules(cfg)
    return wrong


def _mamba_rules(cfg: ModelConfig, family: str) -> list[str]:
    """Mamba2Config / BambaConfig size the mixer as an integer `expand` x hidden_size; their block kinds; Mamba-2
    blocks have no MLP and (without attention) no positions, Bamba's always have an MLP."""
    wrong = []
    m = cfg.mamba2
    if m is not None and m.inner % cfg.d_model:
        wrong.append(
            f"model.mamba2.heads={m.heads} (heads x head_dim = {m.inner} must be a multiple of d_model "
            f"{cfg.d_model}: transformers' integer expand)"
        )
    if family == "mamba2" and cfg.position not in ("rope", "none"):
        wrong.append(
            f"model.position={cfg.position!r} (needs 'none' or 'rope': Mamba-2 has no position weights)"
        )
    return wrong


_MIXERS_ALLOWED = {
    "gemma3_text": {"attention", "attention_local"},
    "qwen3_next": {"gdn", "attention"},
    "deepseek_v3": {"mla"},
    "gpt_oss": {"attention", "attention_local"},
} | _MIXERS
"""Block mixers (model.layers.pattern) a family's layer kinds name; every other family has attention only."""


def _mixer_rules(cfg: ModelConfig, family: str) -> list[str]:
    """model.layers: the mixers the family's layers can be, each block with a feed-forward (every HF family
    here has one per block)."""
    layers = cfg.layers or LayersConfig()
    allowed = _MIXERS_ALLOWED.get(family, {"attention"})
    wrong = []
    if not set(cfg.mixers) <= allowed:
        wrong.append(f"model.layers.pattern={layers.pattern!r} (needs only {' / '.join(sorted(allowed))})")
    mixer_only = family in _MIXER_ONLY_BLOCKS
    if layers.feed_forward == mixer_only:
        need = "false: its blocks have no MLP" if mixer_only else "true: every block has a feed-forward"
        wrong.append(f"model.layers.feed_forward={layers.feed_forward} (needs {need})")
    return wrong


def _gemma2_rules(cfg: ModelConfig) -> list[str]:
    """Gemma 2's scale is query_pre_attn_scalar ** -0.5 for an integer scalar, and its config needs whole
    heads in the hidden size (Gemma2Config.validate_architecture)."""
    wrong = []
    scale = cfg.softmax_scale
    if scale == "none" or (isinstance(scale, float) and round(scale**-2) ** -0.5 != scale):
        wrong.append(f"model.softmax_scale={scale!r} (needs inv_sqrt_dk or n ** -0.5 for an integer n)")
    if cfg.d_model % cfg.n_heads:
        wrong.append(f"model.d_model={cfg.d_model} (needs a multiple of n_heads={cfg.n_heads})")
    return wrong


def query_pre_attn_scalar(cfg: ModelConfig) -> int:
    """Gemma 2's softmax scale as the integer n of n ** -0.5."""
    scale = cfg.softmax_scale
    return cfg.resolved_head_dim if scale == "inv_sqrt_dk" else round(float(scale) ** -2)


def hf_config(cfg: ModelConfig) -> tuple[str, Any]:
    """(transformers model class name, config object) for the family representing `cfg`."""
    import transformers

    family = check_representable(cfg)
    builder = {
        "llama": _llama,
        "mistral": _mistral,
        "qwen3": _qwen3,
        "bloom": _bloom,
        "bert": _bert,
        "t5": _t5,
        "mixtral": _mixtral,
        "qwen3_moe": _qwen3_moe,
        "qwen3_next": _qwen3_next,
        "glm4_moe": _glm4_moe,
        "deepseek_v3": _deepseek_v3,
        "gpt_oss": _gpt_oss,
        "qwen2": _qwen2,
        "phi3": _phi3,
        "gpt2": _gpt2,
        "gemma": _gemma,
        "gemma2": _gemma2,
        "gemma3_text": _gemma3,
        "olmo2": _olmo2,
        "olmo3": _olmo3,
        "mamba2": _mamba2,
        "bamba": _bamba,
    }[family]
    class_name, config_name, kwargs = builder(cfg)
    config = getattr(transformers, config_name)(**kwargs)
    # Some configs (T5 in transformers 5) reset tie_word_embeddings in __init__; the recipe decides.
    config.tie_word_embeddings = cfg.tie_embeddings
    return class_name, config


def _olmo2(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    # head_dim is not in Olmo2Config's signature but is kept as an attribute, which the model reads; its default
    # pad / eos ids (1, 50279) belong to OLMo's own vocabulary
    kwargs = _decoder_common(cfg) | {"attention_bias": False, "pad_token_id": None, "eos_token_id": None}
    return "Olmo2ForCausalLM", "Olmo2Config", kwargs


def _olmo3(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    _, _, kwargs = _olmo2(cfg)
    full = set(cfg.full_attention_layers or ())
    kwargs |= {
        "sliding_window": cfg.sliding_window,
        "layer_types": ["full_attention" if i in full else "sliding_attention" for i in range(cfg.n_layers)],
        # Olmo3Config keeps RoPE per layer kind; Loom's one table serves both
        "rope_parameters": {kind: _rope_parameters(cfg) for kind in ("full_attention", "sliding_attention")},
    }
    return "Olmo3ForCausalLM", "Olmo3Config", kwargs


def _mamba2(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    m = cfg.mamba2
    assert m is not None
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_heads": m.heads,
        "head_dim": m.head_dim,
        "state_size": m.state_dim,
        "n_groups": m.groups,
        "conv_kernel": m.conv_kernel,
        "use_conv_bias": m.conv_bias,
        "use_bias": False,
        "chunk_size": m.chunk_size,
        "expand": m.inner // cfg.d_model,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        # numerics of a half-precision HF model only (transformers' default); no weight depends on it
        "residual_in_fp32": True,
        "time_step_min": m.dt_min,
        "time_step_max": m.dt_max,
        # its defaults (pad 1, bos 0, eos 2) belong to another vocabulary; an export sets the tokenizer's
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return "Mamba2ForCausalLM", "Mamba2Config", kwargs


def _bamba(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    m = cfg.mamba2
    assert m is not None
    kwargs = _decoder_common(cfg) | {
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
        # BambaConfig forces partial_rotary_factor 0.5 (the required rope_fraction)
        "rope_parameters": _rope_parameters(cfg) | {"partial_rotary_factor": cfg.rope_fraction},
        "attn_layer_indices": [i for i, name in enumerate(cfg.mixers) if name == "attention"],
        "mamba_n_heads": m.heads,
        "mamba_d_head": m.head_dim,
        "mamba_n_groups": m.groups,
        "mamba_d_state": m.state_dim,
        "mamba_d_conv": m.conv_kernel,
        "mamba_expand": m.inner // cfg.d_model,
        "mamba_chunk_size": m.chunk_size,
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return "BambaForCausalLM", "BambaConfig", kwargs


def _decoder_common(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.resolved_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": _rope_parameters(cfg),
        "hidden_act": "silu",
    }


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        params.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        params.update(
            rope_type="llama3",
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_seq_len,
        )
    return params


def _llama(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = _decoder_common(cfg) | {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    return "LlamaForCausalLM", "LlamaConfig", kwargs


def _mistral(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    return (
        "MistralForCausalLM",
        "MistralConfig",
        _decoder_common(cfg) | {"sliding_window": cfg.sliding_window},
    )


def _qwen3(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = _decoder_common(cfg) | {"attention_bias": False, "sliding_window": cfg.sliding_window}
    kwargs["use_sliding_window"] = cfg.sliding_window is not None
    return "Qwen3ForCausalLM", "Qwen3Config", kwargs


def _qwen2(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    # head_dim is not in Qwen2Config's signature but is kept as an attribute, and the model reads it.
    # Qwen2 windows the layers from max_window_layers on: from 0, every layer, as Loom's uniform window.
    window = {"use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window}
    return "Qwen2ForCausalLM", "Qwen2Config", _decoder_common(cfg) | window | {"max_window_layers": 0}


def _phi3(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = _decoder_common(cfg) | {"sliding_window": cfg.sliding_window}
    # Phi3Config sets pad/eos to its vocabulary's 32000 by default; they must lie inside this one
    kwargs |= {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return "Phi3ForCausalLM", "Phi3Config", kwargs


def _gpt2(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_hidden,
        "n_positions": cfg.max_seq_len,
        "activation_function": "gelu" if cfg.gelu_approximate == "none" else "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        # GPT2Config defaults every dropout to 0.1; the recipe's rates are what training in HF should use
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
    }
    return "GPT2LMHeadModel", "GPT2Config", kwargs


def _gemma(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = _decoder_common(cfg) | {"attention_bias": False, "hidden_act": "gelu_pytorch_tanh"}
    return "GemmaForCausalLM", "GemmaConfig", kwargs


def _gemma2(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = _decoder_common(cfg) | {"attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"}
    del kwargs["hidden_act"]
    window, full = cfg.sliding_window, set(cfg.full_attention_layers or ())
    sliding = [window is not None and i not in full for i in range(cfg.n_layers)]
    kwargs |= {
        "query_pre_attn_scalar": query_pre_attn_scalar(cfg),
        "final_logit_softcapping": cfg.final_logit_softcap,
        "attn_logit_softcapping": cfg.attention_softcap,
        "sliding_window": cfg.max_seq_len if window is None else window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
    }
    return "Gemma2ForCausalLM", "Gemma2Config", kwargs


def _gemma3(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    _, _, kwargs = _gemma2(cfg)
    layers = cfg.layers or LayersConfig()
    # local layers: their own RoPE base without scaling, or the global RoPE when local_rope_theta is unset
    local = _rope_parameters(cfg)
    if layers.local_rope_theta is not None:
        local = {"rope_type": "default", "rope_theta": layers.local_rope_theta}
    kwargs |= {
        "sliding_window": layers.local_window or cfg.max_seq_len,
        "layer_types": [
            "sliding_attention" if m == "attention_local" else "full_attention" for m in cfg.mixers
        ],
        "rope_parameters": {"full_attention": _rope_parameters(cfg), "sliding_attention": local},
    }
    return "Gemma3ForCausalLM", "Gemma3TextConfig", kwargs


def _bloom(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return "BloomForCausalLM", "BloomConfig", kwargs


def _bert(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "gelu" if cfg.gelu_approximate == "none" else "gelu_new",
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return "BertForMaskedLM", "BertConfig", kwargs


def _t5(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    gated = cfg.mlp == "geglu"
    kwargs = {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.resolved_head_dim,
        "d_ff": cfg.ffn_hidden,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "tie_word_embeddings": cfg.tie_embeddings,
        # Loom never rescales the decoder output; transformers does by default for a tied T5 head
        "scale_decoder_outputs": False,
    }
    return "T5ForConditionalGeneration", "T5Config", kwargs


def _moe_common(cfg: ModelConfig) -> dict[str, Any]:
    assert cfg.moe is not None
    return {
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_loss,
        "router_jitter_noise": cfg.moe.jitter,
    }


def _mixtral(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    assert cfg.moe is not None
    kwargs = _decoder_common(cfg) | _moe_common(cfg)
    # Mixtral's intermediate_size is the width of one expert (every layer is sparse)
    kwargs |= {
        "intermediate_size": cfg.moe.resolved_expert_hidden(cfg.ffn_hidden),
        "num_local_experts": cfg.moe.n_experts,
        "sliding_window": cfg.sliding_window,
    }
    return "MixtralForCausalLM", "MixtralConfig", kwargs


def _qwen3_moe(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    assert cfg.moe is not None
    kwargs = _decoder_common(cfg) | _moe_common(cfg)
    del kwargs["router_jitter_noise"]  # Qwen3-MoE has no router jitter
    # head_dim is not in Qwen3MoeConfig's signature but is kept as an attribute, and the model reads it
    # (it would default to hidden_size / heads, wrong for Qwen3's 128-wide heads)
    kwargs |= {
        "moe_intermediate_size": cfg.moe.resolved_expert_hidden(cfg.ffn_hidden),
        "num_experts": cfg.moe.n_experts,
        "norm_topk_prob": cfg.moe.renormalize,
        # step 1 plus an explicit list of dense layers expresses any first_dense / every placement
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
        "attention_bias": False,
        "use_sliding_window": False,
    }
    return "Qwen3MoeForCausalLM", "Qwen3MoeConfig", kwargs


def _qwen3_next(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    from framework.config.schema import GDNConfig

    kwargs = _decoder_common(cfg) | {"attention_bias": False}
    kwargs["rope_parameters"] |= {"partial_rotary_factor": cfg.rope_fraction}
    g = cfg.gdn if cfg.gdn is not None else GDNConfig()  # unused without gdn blocks, but always in the config
    kwargs |= {
        "layer_types": [{"gdn": "linear_attention"}.get(m, "full_attention") for m in cfg.mixers],
        "linear_num_value_heads": g.heads,
        "linear_num_key_heads": g.resolved_key_heads,
        "linear_key_head_dim": g.key_head_dim,
        "linear_value_head_dim": g.value_head_dim,
        "linear_conv_kernel_dim": g.conv_kernel,
    }
    if cfg.moe is None:
        return "Qwen3NextForCausalLM", "Qwen3NextConfig", kwargs | {"num_experts": 0}
    kwargs |= _moe_common(cfg)
    del kwargs["router_jitter_noise"]  # Qwen3-Next has no router jitter
    kwargs |= {
        "moe_intermediate_size": cfg.moe.resolved_expert_hidden(cfg.ffn_hidden),
        "shared_expert_intermediate_size": cfg.moe.resolved_shared_hidden(cfg.ffn_hidden),
        "num_experts": cfg.moe.n_experts,
        "norm_topk_prob": cfg.moe.renormalize,
        "decoder_sparse_step": 1,  # with the dense layers listed: any first_dense / every placement
        "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
    }
    return "Qwen3NextForCausalLM", "Qwen3NextConfig", kwargs


def _glm4_moe(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    moe = cfg.moe
    assert moe is not None
    kwargs = _decoder_common(cfg) | {"attention_bias": cfg.bias, "use_qk_norm": cfg.qk_norm}
    # head_dim is not in Glm4MoeConfig's fields but is kept as an attribute, which the attention reads
    kwargs["rope_parameters"] |= {"partial_rotary_factor": cfg.rope_fraction}
    kwargs |= {
        "moe_intermediate_size": moe.resolved_expert_hidden(cfg.ffn_hidden),
        "n_routed_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.n_shared_experts,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": moe.renormalize,
        "first_k_dense_replace": moe.first_dense,
        "attention_dropout": cfg.attention_dropout,
        # the MTP depths are exported as layers num_hidden_layers + k (glm4_moe.renames)
        "num_nextn_predict_layers": cfg.mtp.depth if cfg.mtp is not None else 0,
    }
    return "Glm4MoeForCausalLM", "Glm4MoeConfig", kwargs


def _deepseek_v3(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    """GLM-4.5's MoE and decoder fields with MLA's widths, rope_interleave and yarn (deepseek_v3.hf_kwargs); the
    MTP depths are dropped on export (num_nextn_predict_layers 0)."""
    from framework.convert.hf import deepseek_v3

    _, _, kwargs = _glm4_moe(cfg)
    for key in ("use_qk_norm", "head_dim"):
        kwargs.pop(key, None)
    kwargs |= deepseek_v3.hf_kwargs(cfg) | {"num_nextn_predict_layers": 0, "num_key_value_heads": cfg.n_heads}
    return "DeepseekV3ForCausalLM", "DeepseekV3Config", kwargs


def _gpt_oss(cfg: ModelConfig) -> tuple[str, str, dict[str, Any]]:
    from framework.convert.hf import gpt_oss

    return "GptOssForCausalLM", "GptOssConfig", _decoder_common(cfg) | gpt_oss.hf_kwargs(cfg)


def build_hf_model(cfg: ModelConfig) -> Any:
    """The `transformers` model for `cfg` (random init, on the current default device, no download)."""
    import transformers

    class_name, config = hf_config(cfg)
    model = getattr(transformers, class_name)(config)
    if class_name == "T5ForConditionalGeneration":
        # transformers 5 unties the stacks' embed_tokens from `shared` whenever tie_word_embeddings is false;
        # in T5 (v1.1 included) both stacks always read the one shared embedding — only lm_head is untied.
        model.encoder.embed_tokens = model.shared
        model.decoder.embed_tokens = model.shared
    return model
