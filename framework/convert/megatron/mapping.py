"""Tensor-by-tensor mapping between megatron-core's GPT model and Loom's decoder (table in docs/megatron.md).

Three name levels:
1. torch_dist keys as saved: homogeneous layers stacked on a leading layer axis (`decoder.layers.<name>`
   [L, ...]), otherwise one key per layer (`decoder.layers.<i>.<name>`); experts stacked on an expert axis
   (`mlp.experts.experts.<name>` [E, ...]) or one key per expert (`mlp.experts.experts.<e>.<name>`).
2. canonical names used below: one key per layer, experts stacked, norms under their module names
   (`input_layernorm`, `pre_mlp_layernorm`). The local layer spec saves those norms under the names of the
   Transformer Engine spec's fused norm+linear (`self_attention.linear_qkv.layer_norm_weight`,
   `mlp.linear_fc1.layer_norm_weight`); both spellings are accepted on import, the saved one is written.
3. Loom's state dict names.

Fused tensors: linear_qkv rows are grouped per query group g as [q heads of g, k_g, v_g] (each head_dim rows);
linear_fc1 of a gated MLP is [gate; up] (megatron's glu: chunk(2) -> act(first) * second). RoPE: megatron's
default (rotary_interleaved false) rotates the two halves of a head, Loom rotates interleaved pairs, so q/k rows
(and QK-norm weights) are permuted as for Hugging Face; with rotary_interleaved they are copied.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf.mapping import Rename, copy, halves_to_interleaved, interleaved_to_halves

Tensor = torch.Tensor
LAYERS = "decoder.layers."
_STACKED_LAYERS = re.compile(r"^decoder\.layers\.(?!\d+\.)(?P<rest>.+)$")
_EXPERTS = re.compile(
    r"^(?P<layer>decoder\.layers\.\d+\.mlp\.experts\.)(?:experts|local_experts)\.(?P<rest>.+)$"
)
_PER_EXPERT = re.compile(r"^(?P<e>\d+)\.(?P<rest>.+)$")
# fused-norm spellings (saved by both the TE and the local spec) -> the module names of the local spec
NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_GROUPED_GEMM = ("mlp.experts.weight1", "mlp.experts.weight2")


# GPTModel's top-level modules; Megatron-LM saves optimizer states ("optimizer.", fp32 moments) and RNG / rerun
# state beside them in the same checkpoint, which the import leaves on disk
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_UNSUPPORTED_PREFIXES = {"mtp.": "multi-token prediction layers (mtp_num_layers)"}


def is_model_key(key: str) -> bool:
    """Whether a torch_dist key is part of the GPT model (ConfigError for model parts Loom cannot hold)."""
    for prefix, what in _UNSUPPORTED_PREFIXES.items():
        if key.startswith(prefix):
            raise _error(key, f"belongs to {what}, which Loom's model does not have",
                         "convert a model trained without them")  # fmt: skip
    return key.startswith(MODEL_PREFIXES)


def _error(key: str, rule: str, fix: str) -> ConfigError:
    return ConfigError(None, "megatron checkpoint", key, rule, fix)


# -------------------------------------------------------------------------------- torch_dist <-> canonical


def canonical(saved: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """torch_dist keys (either layer/expert layout, either norm spelling) -> canonical names."""
    per_layer: dict[str, Tensor] = {}
    for key, tensor in saved.items():
        match = _STACKED_LAYERS.match(key)
        if match is None:
            per_layer[key] = tensor
            continue
        if tensor.shape[0] != n_layers:
            raise _error(key, f"stacks {tensor.shape[0]} layers, the config says num_layers={n_layers}",
                         "pass the megatron_config.yaml of this checkpoint")  # fmt: skip
        per_layer |= {f"{LAYERS}{i}.{match['rest']}": t for i, t in enumerate(tensor)}
    return _rename_norms(_stack_experts(per_layer))


def _stack_experts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    singles: dict[str, dict[int, Tensor]] = {}
    for key, tensor in state.items():
        if key.split(".", 3)[-1] in _GROUPED_GEMM:
            raise _error(
                key, "is the legacy grouped-GEMM expert layout", "re-save with a current megatron-core"
            )
        match = _EXPERTS.match(key)
        single = _PER_EXPERT.match(match["rest"]) if match else None
        if single is None:
            out[key] = tensor
            continue
        name = f"{match['layer']}experts.{single['rest']}"
        singles.setdefault(name, {})[int(single["e"])] = tensor
    for name, experts in singles.items():
        if sorted(experts) != list(range(len(experts))):
            raise _error(name, f"has experts {sorted(experts)}, not 0..E-1", "convert a complete checkpoint")
        out[name] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def _rename_norms(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state.items():
        if key.startswith(LAYERS):
            layer, _, rest = key[len(LAYERS) :].partition(".")
            key = f"{LAYERS}{layer}.{NORM_ALIASES.get(rest, rest)}"
        out[key] = tensor
    return out


def torch_dist_keys(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Canonical names -> the keys megatron-core's local spec saves: fused-norm spellings, and layers stacked
    unless the MoE layers are not all layers (megatron then saves per layer, as `non_homogeneous_layers`)."""
    fused = {v: k for k, v in NORM_ALIASES.items()}
    renamed = {}
    for key, tensor in state.items():
        if key.startswith(LAYERS):
            layer, _, rest = key[len(LAYERS) :].partition(".")
            key = f"{LAYERS}{layer}.{fused.get(rest, rest)}"
        renamed[key] = tensor
    if cfg.moe is not None and len(cfg.moe_layers) != cfg.n_layers:
        return renamed
    out = {k: v for k, v in renamed.items() if not k.startswith(LAYERS)}
    names = [k.split(".", 3)[3] for k in renamed if k.startswith(f"{LAYERS}0.")]
    for name in names:
        out[f"{LAYERS}{name}"] = torch.stack([renamed[f"{LAYERS}{i}.{name}"] for i in range(cfg.n_layers)])
    return out


# ------------------------------------------------------------------------------------ canonical <-> Loom


def _qkv(cfg: ModelConfig, permute: bool) -> tuple[Callable, Callable]:
    """(fuse [wq, wk, wv] -> linear_qkv, split linear_qkv -> [wq, wk, wv]) for weights [rows, D] or biases."""
    heads, groups, d = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    per = heads // groups

    def fuse(ts: list[Tensor]) -> Tensor:
        q, k, v = ts
        if permute:
            q, k = interleaved_to_halves(q, heads), interleaved_to_halves(k, groups)
        rest = q.shape[1:]
        parts = [q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)]
        return torch.cat(parts, dim=1).reshape(groups * (per + 2) * d, *rest)

    def split(fused: Tensor) -> list[Tensor]:
        rest = fused.shape[1:]
        q, k, v = fused.reshape(groups, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        q, k, v = (t.reshape(-1, *rest).contiguous() for t in (q, k, v))
        if permute:
            q, k = halves_to_interleaved(q, heads), halves_to_interleaved(k, groups)
        return [q, k, v]

    return fuse, split


def _cat(dim: int) -> tuple[Callable, Callable]:
    return (lambda ts: torch.cat(ts, dim=dim)), (lambda t: [c.contiguous() for c in t.chunk(2, dim=dim)])


def _norm(cfg: ModelConfig, loom: str, meg: str) -> list[Rename]:
    names = ["weight", "bias"] if cfg.norm == "layernorm" else ["weight"]
    return [copy(f"{loom}.{n}", f"{meg}.{n}") for n in names]


def _linear(cfg: ModelConfig, loom: str, meg: str) -> list[Rename]:
    return [copy(f"{loom}.{n}", f"{meg}.{n}") for n in (["weight", "bias"] if cfg.bias else ["weight"])]


def _attention(cfg: ModelConfig, src: str, dst: str, permute: bool) -> list[Rename]:
    fuse, split = _qkv(cfg, permute)
    names = ["weight", "bias"] if cfg.bias else ["weight"]
    out = [Rename(tuple(f"{src}attention.{p}.{n}" for p in ("wq", "wk", "wv")),
                  f"{dst}self_attention.linear_qkv.{n}", fuse, split) for n in names]  # fmt: skip
    out += _linear(cfg, f"{src}attention.wo", f"{dst}self_attention.linear_proj")
    if cfg.qk_norm:
        for loom, meg in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            for r in _norm(cfg, f"{src}attention.{loom}", f"{dst}self_attention.{meg}"):
                perm = (lambda t: interleaved_to_halves(t[0], 1), lambda t: [halves_to_interleaved(t, 1)])
                out.append(Rename(r.loom, r.hf, *perm) if permute else r)
    return out


def _mlp(cfg: ModelConfig, src: str, dst: str, gated: bool) -> list[Rename]:
    """A dense MLP (w1 gate, w3 up, w2 down) onto linear_fc1 ([gate; up] when gated) and linear_fc2."""
    names = ["weight", "bias"] if cfg.bias else ["weight"]
    out = [copy(f"{src}w2.{n}", f"{dst}linear_fc2.{n}") for n in names]
    if not gated:
        return out + [copy(f"{src}w1.{n}", f"{dst}linear_fc1.{n}") for n in names]
    return out + [Rename((f"{src}w1.{n}", f"{src}w3.{n}"), f"{dst}linear_fc1.{n}", *_cat(0)) for n in names]


def _moe(cfg: ModelConfig, src: str, dst: str, gated: bool) -> list[Rename]:
    assert cfg.moe is not None
    out = [copy(f"{src}router.gate.weight", f"{dst}router.weight")]
    if cfg.moe.bias_update_rate > 0:
        out.append(copy(f"{src}router.expert_bias", f"{dst}router.expert_bias"))
    experts, meg = f"{src}experts.", f"{dst}experts.experts."
    out.append(copy(f"{experts}w2", f"{meg}linear_fc2.weight"))
    if gated:  # [E, H, D] gate and up -> [E, 2H, D] per-expert [gate; up]
        out.append(Rename((f"{experts}w1", f"{experts}w3"), f"{meg}linear_fc1.weight", *_cat(1)))
    else:
        out.append(copy(f"{experts}w1", f"{meg}linear_fc1.weight"))
    if cfg.moe.n_shared_experts:
        out += _mlp(cfg, f"{src}shared_experts.", f"{dst}shared_experts.", gated)
    return out


def renames(cfg: ModelConfig, interleaved: bool = False) -> list[Rename]:
    """Every Loom tensor of cfg's decoder with its canonical megatron name. interleaved: megatron's
    rotary_interleaved (RoPE pairs already in Loom's order)."""
    permute = cfg.position == "rope" and not interleaved
    gated = cfg.mlp in ("swiglu", "geglu")
    out = [copy("tok_embeddings.weight", "embedding.word_embeddings.weight")]
    if cfg.position == "learned":
        out.append(copy("pos_embeddings.weight", "embedding.position_embeddings.weight"))
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"{LAYERS}{i}."
        out += _norm(cfg, f"{src}attention_norm", f"{dst}input_layernorm")
        out += _attention(cfg, src, dst, permute)
        out += _norm(cfg, f"{src}ffn_norm", f"{dst}pre_mlp_layernorm")
        ffn = _moe if cfg.is_moe_layer(i) else _mlp
        out += ffn(cfg, f"{src}feed_forward.", f"{dst}mlp.", gated)
    out += _norm(cfg, "norm", "decoder.final_layernorm")
    if not cfg.tie_embeddings:
        out.append(copy("output.weight", "output_layer.weight"))
    return out


def to_megatron(rules: list[Rename], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loom state -> canonical megatron state; every Loom tensor used exactly once."""
    unused = sorted(set(state) - {n for r in rules for n in r.loom})
    missing = sorted({n for r in rules for n in r.loom} - set(state))
    if unused or missing:
        key = (unused or missing)[0]
        raise _error(key, "is in the Loom model but not in the mapping" if unused else "is missing",
                     "convert a checkpoint of the architecture its recipe describes")  # fmt: skip
    return {r.hf: r.to_hf([state[n] for n in r.loom]).contiguous() for r in rules}


def from_megatron(rules: list[Rename], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical megatron state -> Loom state; a tensor on either side without a partner is a ConfigError."""
    missing = sorted(r.hf for r in rules if r.hf not in state)
    if missing:
        raise _error(missing[0], "is missing from the checkpoint",
                     "check megatron_config.yaml against the checkpoint (layers, experts, biases, tied head)")  # fmt: skip
    unused = sorted(set(state) - {r.hf for r in rules})
    if unused:
        raise _error(unused[0], "has no counterpart in Loom's model (or megatron_config.yaml does not describe it)",
                     "check megatron_config.yaml; docs/megatron.md lists what converts")  # fmt: skip
    out: dict[str, Tensor] = {}
    for r in rules:
        out.update(zip(r.loom, r.from_hf(state[r.hf]), strict=True))
    return out
