"""DeepSeek-V3 (DeepseekV3ForCausalLM; Kimi-K2 checkpoints are this family too): Multi-head Latent Attention blocks
(model.layers.pattern [mla], model.mla) with GLM-4.5's MoE layers (the same DeepSeek routing: sigmoid scores,
group-limited top-k on scores + e_score_correction_bias, renormalised, times routed_scaling_factor; ungated shared
experts; the first first_k_dense_replace layers dense).

MLA tensors, Loom `layers.{i}.attention.` -> `model.layers.{i}.self_attn.`: wq -> q_proj, or wq_a -> q_a_proj,
q_norm -> q_a_layernorm, wq_b -> q_b_proj; wkv_a -> kv_a_proj_with_mqa, kv_norm -> kv_a_layernorm, wkv_b ->
kv_b_proj, wo -> o_proj: plain copies. Loom rotates RoPE channel pairs (2i, 2i+1), which is DeepSeek's
rope_interleave layout (transformers de-interleaves q_pe and k_pe and rotates halves: the same scores), so the
rope rows need no permutation; an export writes rope_interleave true and an import refuses false.

YaRN (rope_parameters rope_type yarn: factor, original_max_position_embeddings, beta_fast / beta_slow, mscale /
mscale_all_dim) maps to model.rope_scaling yarn and the rope_yarn_* fields; MLA's softmax scale takes
mscale_all_dim as transformers' does. MTP layers (num_nextn_predict_layers) are imported when the weights hold them
(framework/convert/hf/mtp.py) and dropped on export, as transformers' DeepseekV3ForCausalLM ignores them.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, MLAConfig, ModelConfig
from framework.convert.hf import glm4_moe, llama
from framework.convert.hf.mapping import Rename, copy
from framework.convert.hf.mtp import mtp_renames

Tensor = torch.Tensor
LAYER = llama.LAYER
FILES = glm4_moe.FILES
optional = glm4_moe.optional
to_files = glm4_moe.to_files
from_files = glm4_moe.from_files
state_fields = glm4_moe.state_fields
feed_forward = glm4_moe.feed_forward
_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
          "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}  # fmt: skip


def attention(cfg: ModelConfig, i: int) -> list[Rename]:
    """Block i's MLA tensors (module docstring); biases where attention_bias puts them (q_a, kv_a, o)."""
    assert cfg.mla is not None
    src, dst = f"layers.{i}.attention.", LAYER.format(i=i) + "self_attn."
    ours = ["wq"] if cfg.mla.q_lora_rank is None else ["wq_a", "q_norm", "wq_b"]
    ours += ["wkv_a", "kv_norm", "wkv_b", "wo"]
    out = [copy(f"{src}{name}.weight", f"{dst}{_NAMES[name]}.weight") for name in ours]
    biased = [n for n in ("wq_a", "wkv_a") if n in ours] if cfg.bias else []
    biased += ["wo"] if cfg.dense_bias else []
    return out + [copy(f"{src}{name}.bias", f"{dst}{_NAMES[name]}.bias") for name in biased]


def block(cfg: ModelConfig, i: int) -> list[Rename]:
    return llama.block(cfg, i, feed_forward, attention)


def renames(cfg: ModelConfig) -> list[Rename]:
    """Llama's embedding / norms / head with MLA blocks and DeepSeek MoE layers, then any MTP depths."""
    return llama.renames(cfg, ffn=feed_forward, mixer=attention) + mtp_renames(cfg, block)


def _mla(hf: Any) -> MLAConfig:
    return MLAConfig(
        kv_lora_rank=hf.kv_lora_rank,
        q_lora_rank=hf.q_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
    )


def rope_fields(hf: Any) -> dict[str, Any]:
    """RoPE base and YaRN scaling from rope_parameters (default or yarn)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    if kind not in ("default", "yarn"):
        raise ConfigError(
            "config.json", "rope_parameters.rope_type", kind, "DeepSeek-V3 imports default or yarn RoPE",
            "import a checkpoint with default or yarn rope_parameters",
        )  # fmt: skip
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "yarn":
        out |= {
            "rope_scaling": "yarn",
            "rope_scaling_factor": float(params["factor"]),
            "rope_original_max_seq_len": int(params["original_max_position_embeddings"]),
            "rope_yarn_beta_fast": float(params.get("beta_fast") or 32),
            "rope_yarn_beta_slow": float(params.get("beta_slow") or 1),
            "rope_yarn_mscale": _optional_float(params.get("mscale")),
            "rope_yarn_mscale_all_dim": _optional_float(params.get("mscale_all_dim")),
            "rope_yarn_truncate": bool(params.get("truncate", True)),
        }
    return out


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def model_config(hf: Any) -> dict[str, Any]:
    if not getattr(hf, "rope_interleave", True):
        raise ConfigError(
            "config.json", "rope_interleave", False,
            "Loom's RoPE rotates channel pairs (DeepSeek's interleaved layout); the half layout is not mapped",
            "import a checkpoint with rope_interleave true (DeepSeek-V3's and Kimi-K2's default)",
        )  # fmt: skip
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise ConfigError(
            "config.json", "num_key_value_heads", hf.num_key_value_heads,
            "MLA has one latent for all heads: num_key_value_heads must equal num_attention_heads",
            "import a checkpoint with num_key_value_heads equal to num_attention_heads",
        )  # fmt: skip
    fields = glm4_moe.model_config(_as_glm(hf))
    fields = {
        k: v for k, v in fields.items() if k not in ("kv_heads", "head_dim", "rope_fraction", "qk_norm")
    }
    fields["bias_scope"] = "all"  # attention_bias: q_a / kv_a / o (no MLP biases; MoE allows none else)
    return fields | rope_fields(hf) | {"layers": LayersConfig(pattern=["mla"]), "mla": _mla(hf)}


class _as_glm:  # noqa: N801 (a view of the config, read like a Glm4MoeConfig by glm4_moe.model_config)
    """DeepseekV3Config read through glm4_moe.model_config: the same MoE and Llama fields; no QK-norm, no partial
    rotary (MLA's rope channels are model.mla's), the RoPE fields replaced by `rope_fields`."""

    def __init__(self, hf: Any) -> None:
        self._hf = hf

    def __getattr__(self, name: str) -> Any:
        if name == "use_qk_norm":
            return False
        if name == "rope_parameters":
            return {"rope_type": "default", "partial_rotary_factor": 1.0}
        if name == "head_dim":
            return None
        return getattr(self._hf, name)


def hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """DeepseekV3Config's MLA and RoPE fields for `cfg` (configs.py adds the shared decoder and MoE ones)."""
    assert cfg.mla is not None
    m = cfg.mla
    return {
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_interleave": True,
        "attention_bias": cfg.bias,
        "rope_parameters": rope_parameters(cfg),
    }


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        params |= {
            "rope_type": "yarn",
            "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
            "beta_fast": cfg.rope_yarn_beta_fast,
            "beta_slow": cfg.rope_yarn_beta_slow,
            "truncate": cfg.rope_yarn_truncate,
        }
        params |= {k: v for k, v in (("mscale", cfg.rope_yarn_mscale),
                                     ("mscale_all_dim", cfg.rope_yarn_mscale_all_dim)) if v is not None}  # fmt: skip
    return params
