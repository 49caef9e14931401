"""Qwen3-Next (Qwen3NextForCausalLM): a hybrid of Gated DeltaNet blocks (`linear_attention`) and gated attention
blocks (`full_attention`), named per layer by `layer_types` (Loom's model.layers.pattern), over Qwen3-MoE's
fine-grained experts plus one sigmoid-gated shared expert.

Attention: q_proj emits, per head, the query (head_dim rows) then its output gate (head_dim rows): Loom's wq and
wg rows interleaved by head. Queries and keys get per-head zero-centred RMSNorm ((1 + w)) and partial RoPE over
the first partial_rotary_factor x head_dim channels (only those rows are permuted into HF's half layout). Every
RMSNorm of the model is zero-centred (model.norm_weight_offset) except the Gated DeltaNet's gated output norm,
whose gain is plain (Loom's gdn.norm_weight). Sparse layers follow Qwen3-MoE's mlp_only_layers /
decoder_sparse_step rule (qwen3_moe._placement); num_experts 0 is a dense model.

Weights: the Gated DeltaNet tensors are renamed one-to-one onto an intermediate `linear_attn.<Loom name>` and
fused into HF's in_proj_qkvz / in_proj_ba / conv1d layout per layer by gdn_weights (to_files / from_files), as the
experts are split per expert by experts.to_files.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.config.errors import ConfigError
from framework.config.schema import GDNConfig, LayersConfig, ModelConfig, MoEConfig
from framework.convert.hf import experts, llama, qwen3_moe
from framework.convert.hf.gdn_weights import from_hf_gdn_state, to_hf_gdn_state
from framework.convert.hf.mapping import (
    Rename,
    copy,
    halves_to_interleaved,
    interleaved_to_halves,
    layer_period,
    rope,
)
from framework.models.positions import rotary_dim

Tensor = torch.Tensor
LAYER = llama.LAYER
FILES = experts.FileLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
KINDS = {"gdn": "linear_attention", "attention": "full_attention"}
"""Loom mixer -> transformers layer type."""
GDN_NAMES = ("wq.weight", "wk.weight", "wv.weight", "wz.weight", "wb.weight", "wa.weight", "q_conv", "k_conv",
             "v_conv", "A_log", "dt_bias", "norm_weight", "wo.weight")  # fmt: skip
"""Loom GatedDeltaNet parameters (renamed onto linear_attn.<name>, then fused by gdn_weights)."""


def optional(name: str) -> bool:
    """Llama's optional tensors, and the Hub checkpoint's multi-token-prediction head (`mtp.*`), which
    transformers does not load either (_keys_to_ignore_on_load_unexpected) and Loom has no module for."""
    return llama.optional(name) or name.startswith("mtp.")


def _fuse_query_gate(heads: int, head_dim: int, rotated: int):
    """q_proj [heads x (query, gate), D] <-> Loom wq (RoPE rows interleaved) and wg."""

    def to_hf(tensors: list[Tensor]) -> Tensor:
        query = interleaved_to_halves(tensors[0], heads, rotated).unflatten(0, (heads, head_dim))
        gate = tensors[1].unflatten(0, (heads, head_dim))
        return torch.cat((query, gate), dim=1).flatten(0, 1)

    def from_hf(fused: Tensor) -> list[Tensor]:
        query, gate = fused.unflatten(0, (heads, 2 * head_dim)).chunk(2, dim=1)
        return [halves_to_interleaved(query.flatten(0, 1), heads, rotated), gate.flatten(0, 1).contiguous()]

    return to_hf, from_hf


def attention(cfg: ModelConfig, i: int) -> list[Rename]:
    src, dst = f"layers.{i}.attention.", LAYER.format(i=i) + "self_attn."
    heads, hd, rot = cfg.n_heads, cfg.resolved_head_dim, rotary_dim(cfg)
    to_hf, from_hf = _fuse_query_gate(heads, hd, rot)
    return [
        Rename((f"{src}wq.weight", f"{src}wg.weight"), f"{dst}q_proj.weight", to_hf, from_hf),
        rope(f"{src}wk.weight", f"{dst}k_proj.weight", cfg.resolved_kv_heads, rot),
        copy(f"{src}wv.weight", f"{dst}v_proj.weight"),
        copy(f"{src}wo.weight", f"{dst}o_proj.weight"),
        # per-head norms before RoPE: their channels follow the rotated rows' permutation
        rope(f"{src}q_norm.weight", f"{dst}q_norm.weight", 1, rot),
        rope(f"{src}k_norm.weight", f"{dst}k_norm.weight", 1, rot),
    ]


def gdn(i: int) -> list[Rename]:
    src, dst = f"layers.{i}.gdn.", LAYER.format(i=i) + "linear_attn."
    return [copy(src + name, dst + name) for name in GDN_NAMES]


def feed_forward(cfg: ModelConfig, i: int) -> list[Rename]:
    if not cfg.is_moe_layer(i):
        return llama.feed_forward(cfg, i)
    src, dst = f"layers.{i}.feed_forward.", LAYER.format(i=i) + "mlp."
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    shared = [copy(f"{src}shared_experts.{ours}.weight", f"{dst}shared_expert.{theirs}.weight")
              for ours, theirs in names.items()]  # fmt: skip
    gate = copy(f"{src}shared_expert_gate.weight", f"{dst}shared_expert_gate.weight")
    return experts.moe_renames(i, LAYER.format(i=i)) + shared + [gate]


def renames(cfg: ModelConfig) -> list[Rename]:
    """Llama's layout with each layer's mixer (gated attention or Gated DeltaNet) and its MoE feed-forward."""
    return llama.renames(cfg, feed_forward, _mixer)


def _mixer(cfg: ModelConfig, i: int) -> list[Rename]:
    return gdn(i) if cfg.mixer(i) == "gdn" else attention(cfg, i)


def _gdn_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.mixer(i) == "gdn"]


def to_files(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renamed state -> HF's layout: Gated DeltaNet tensors fused per layer, experts split per expert."""
    out = dict(state)
    for i in _gdn_layers(cfg):
        base = LAYER.format(i=i) + "linear_attn."
        ours = {name: out.pop(base + name) for name in GDN_NAMES}
        out |= {base + name: t for name, t in to_hf_gdn_state(ours, cfg).items()}
    return experts.to_files(out, FILES)


_HF_GDN_NAMES = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias", "norm.weight",
                 "out_proj.weight")  # fmt: skip
"""transformers' Qwen3NextGatedDeltaNet tensors (gdn_weights reads exactly these)."""


def from_files(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Either expert layout and HF's fused Gated DeltaNet tensors -> the names `renames` uses; anything else
    stays for the name-by-name check (which reports it as unexpected)."""
    out = experts.from_files(state, FILES, cfg) if cfg.moe is not None else dict(state)
    for i in _gdn_layers(cfg):
        base = LAYER.format(i=i) + "linear_attn."
        missing = [base + name for name in _HF_GDN_NAMES if base + name not in out]
        if missing:
            raise ConfigError(
                None, "Hugging Face weights", missing[0], "is missing (a linear_attention layer's tensor)",
                "convert a complete checkpoint whose config.json has these layer_types",
            )  # fmt: skip
        theirs = {name: out.pop(base + name) for name in _HF_GDN_NAMES}
        try:
            ours = from_hf_gdn_state(theirs, cfg)
        except RuntimeError:  # a reshape to the config's head layout failed
            shapes = {name: tuple(t.shape) for name, t in theirs.items()}
            raise ConfigError(
                None, "Hugging Face weights", base + "in_proj_qkvz.weight",
                f"do not have the shapes model.gdn describes ({shapes})", "check that config.json belongs to these weights",
            ) from None  # fmt: skip
        out |= {base + name: t for name, t in ours.items()}
    return out


# ------------------------------------------------------------------------------------------------------ config
def pattern(layer_types: list[str]) -> list[str]:
    """The shortest prefix of the Loom mixers of `layer_types` that repeats into all of them (the period)."""
    back = {v: k for k, v in KINDS.items()}
    unknown = sorted(set(layer_types) - set(back))
    if unknown:
        raise ConfigError(
            "config.json", "layer_types", unknown[0], "is not a Qwen3-Next layer type Loom builds",
            "import a checkpoint whose layer_types are linear_attention / full_attention",
        )  # fmt: skip
    return layer_period([back[t] for t in layer_types])


def _moe(hf: Any) -> MoEConfig | None:
    if not qwen3_moe.sparse_layers(hf):
        return None  # num_experts 0, or every layer in mlp_only_layers: a dense model
    return MoEConfig(
        n_experts=hf.num_experts,
        top_k=hf.num_experts_per_tok,
        expert_hidden=hf.moe_intermediate_size,
        n_shared_experts=1,
        shared_expert_hidden=hf.shared_expert_intermediate_size,
        shared_expert_gate=True,
        renormalize=bool(hf.norm_topk_prob),
        aux_loss=float(hf.router_aux_loss_coef),
        **qwen3_moe._placement(hf),
    )


def model_config(hf: Any) -> dict[str, Any]:
    llama._require(hf, "attention_bias", not getattr(hf, "attention_bias", False), "false")
    fields = llama.model_config(hf)
    params = dict(getattr(hf, "rope_parameters", None) or {})
    mixers = pattern(list(hf.layer_types))
    gdn_cfg = GDNConfig(
        heads=hf.linear_num_value_heads, key_heads=hf.linear_num_key_heads, key_head_dim=hf.linear_key_head_dim,
        value_head_dim=hf.linear_value_head_dim, conv_kernel=hf.linear_conv_kernel_dim,
    )  # fmt: skip
    return fields | {
        "qk_norm": True,
        "norm_weight_offset": True,
        "attention_gate": True,
        # transformers 5 keeps it in rope_parameters; older config.json files have it at the top level
        "rope_fraction": float(
            params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
        ),
        # all full_attention: a plain attention model, as Loom writes it (no model.layers)
        "layers": None if mixers == ["attention"] else LayersConfig(pattern=mixers),  # type: ignore[arg-type]
        "gdn": gdn_cfg if "gdn" in mixers else None,
        "moe": _moe(hf),
    }
