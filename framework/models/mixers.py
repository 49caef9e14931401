"""The registry of sequence mixers: what each name of `model.layers.pattern` builds, where its parameters live,
which context it reads, and its parameter, FLOP, activation-memory and parallelism facts.

A block holds exactly one mixer, under the attribute its entry names (`attention`, `gdn`, `mamba`), so
parameter names are stable per layer index (`layers.3.gdn.wq.weight`) and pipeline stages can still drop
layers. Adding a mixer is one module file, one `Mixer` entry here and its formulas (docs/architecture.md):
nothing else compares mixer names. Formulas follow docs/flops.md: matmul FLOPs are 2 x the weight-matrix
parameters a token touches (counted from `matmul_params`); `mixing_flops` is the rest of the mixer's matmul work
per token at a sequence length (attention's q.k and p.v; the linear mixers' state and chunk products).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from framework.config.schema import GDNConfig, Mamba2Config, MixerName, MLAConfig, ModelConfig

ContextKind = Literal["global", "local"]
"""Which AttentionContext of the stack a mixer reads: the model's (window model.sliding_window, RoPE
model.rope_theta) or the local one (model.layers.local_window and local_rope_theta)."""


@dataclass(frozen=True)
class Mixer:
    """One registry entry."""

    name: MixerName
    attr: str
    """The block attribute that holds the module (part of every parameter name)."""
    build: Callable[[ModelConfig], nn.Module]
    context: ContextKind
    params: Callable[[ModelConfig], int]
    """Parameters of one module."""
    matmul_params: Callable[[ModelConfig], int]
    """Weight-matrix parameters a token multiplies with (2 FLOPs each per token, forward)."""
    mixing_flops: Callable[[ModelConfig, int, int | None], float]
    """Forward FLOPs per token of the token mixing itself at (seq_len, window); linear mixers ignore window."""
    recurrent: bool
    """A linear recurrence (state carried along the sequence): context parallelism passes its state between
    ranks instead of Ulysses' head exchange."""
    head_counts: Callable[[ModelConfig], dict[str, int]]
    """Recipe key -> count that tensor parallelism splits (and, for attention, Ulysses with it): each must be
    divisible by tp (attention: by cp x tp)."""
    activation_bytes: Callable[[ModelConfig, Any, Any], int]
    """(cfg, sizes, shape) -> bytes one module saves for backward over one micro-batch, after its input
    projections (framework/models/memory.py: `_Sizes` bytes per element, `_Shape` batch and sequence)."""
    input_readers: Callable[[ModelConfig], int]
    """Linears that read the block's normed input (autocast keeps one copy of it per linear)."""


def _build_attention(cfg: ModelConfig) -> nn.Module:
    from framework.models.attention import Attention

    return Attention(cfg)


def _build_mla(cfg: ModelConfig) -> nn.Module:
    from framework.models.mla import MLA

    return MLA(cfg)


def _build_gdn(cfg: ModelConfig) -> nn.Module:
    from framework.models.gdn import GatedDeltaNet

    return GatedDeltaNet(cfg)


def _build_mamba2(cfg: ModelConfig) -> nn.Module:
    from framework.models.mamba2 import Mamba2

    return Mamba2(cfg)


# ------------------------------------------------------------------------------------------- attention facts
def attention_matrix_params(cfg: ModelConfig) -> int:
    """wq, wk, wv, wo weights (GQA shrinks wk and wv to kv_heads x head_dim columns), and wg for gated
    attention output (d_model x n_heads x head_dim, as wq)."""
    d, q_width = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim
    kv_width = cfg.resolved_kv_heads * cfg.resolved_head_dim
    return (2 + int(cfg.attention_gate)) * d * q_width + 2 * d * kv_width


def _attention_params(cfg: ModelConfig) -> int:
    from framework.models.flops import attention_params

    return attention_params(cfg)


def _attention_mixing(cfg: ModelConfig, seq_len: int, window: int | None) -> float:
    from framework.models.flops import attention_flops_per_query, mean_keys_attended

    return attention_flops_per_query(cfg, mean_keys_attended(seq_len, causal=cfg.causal, window=window))


def _attention_activations(cfg: ModelConfig, sizes: Any, shape: Any) -> int:
    from framework.models.memory import attention_activation_bytes

    return attention_activation_bytes(cfg, sizes, shape)


def _attention_readers(cfg: ModelConfig) -> int:
    """wq, wk, wv, and wg with the output gate."""
    return 3 + int(cfg.attention_gate)


def _attention_heads(cfg: ModelConfig) -> dict[str, int]:
    return {"model.n_heads": cfg.n_heads, "model.kv_heads": cfg.resolved_kv_heads}


# ---------------------------------------------------------------------------------------------- MLA facts
def _mla(cfg: ModelConfig) -> MLAConfig:
    if cfg.mla is None:
        raise ValueError("an mla block needs model.mla")
    return cfg.mla


def _mla_matrix_params(cfg: ModelConfig) -> int:
    """The query path (wq, or wq_a then wq_b), wkv_a (d -> latent + shared rope key), wkv_b (latent -> per-head
    nope keys and values) and wo (heads x v_head_dim -> d)."""
    m, d, h = _mla(cfg), cfg.d_model, cfg.n_heads
    q_out = h * m.qk_head_dim
    query = d * q_out if m.q_lora_rank is None else m.q_lora_rank * (d + q_out)
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return query + kv + h * m.v_head_dim * d


def _mla_params(cfg: ModelConfig) -> int:
    """Matrices, the latent norms' gains (kv_norm, and q_norm with q_lora_rank), biases on wq_a / wkv_a (model.bias)
    and wo (bias_scope all)."""
    m = _mla(cfg)
    norms = m.kv_lora_rank + (m.q_lora_rank or 0)
    biases = (m.kv_lora_rank + m.qk_rope_head_dim + (m.q_lora_rank or 0)) if cfg.bias else 0
    return _mla_matrix_params(cfg) + norms + biases + (cfg.d_model if cfg.dense_bias else 0)


def _mla_mixing(cfg: ModelConfig, seq_len: int, window: int | None) -> float:
    """q.k over nope + rope channels and p.v over v_head_dim, per head and key attended (the expanded keys and
    values: the training path does not attend in the latent)."""
    from framework.models.flops import mean_keys_attended

    m = _mla(cfg)
    keys = mean_keys_attended(seq_len, causal=cfg.causal, window=window)
    return 2.0 * cfg.n_heads * (m.qk_head_dim + m.v_head_dim) * keys


def _mla_activations(cfg: ModelConfig, sizes: Any, shape: Any) -> int:
    from framework.models.memory import mla_activation_bytes

    return mla_activation_bytes(cfg, sizes, shape)


# --------------------------------------------------------------------------------------------- GDN facts
def _gdn(cfg: ModelConfig) -> GDNConfig:
    if cfg.gdn is None:
        raise ValueError("a gdn block needs model.gdn")
    return cfg.gdn


def _gdn_matrix_params(cfg: ModelConfig) -> int:
    """wq, wk (key_heads x dk), wv, wz (heads x dv), wb, wa (heads) and wo (heads x dv -> d)."""
    g, d = _gdn(cfg), cfg.d_model
    keys, values = g.resolved_key_heads * g.key_head_dim, g.heads * g.value_head_dim
    return d * (2 * keys + 2 * values + 2 * g.heads) + values * d


def _gdn_params(cfg: ModelConfig) -> int:
    """Matrices, the depthwise conv taps over q, k, v, A_log and dt_bias per head, the gated norm's gain."""
    g = _gdn(cfg)
    conv_channels = 2 * g.resolved_key_heads * g.key_head_dim + g.heads * g.value_head_dim
    return _gdn_matrix_params(cfg) + conv_channels * g.conv_kernel + 2 * g.heads + g.value_head_dim


def _gdn_mixing(cfg: ModelConfig, seq_len: int, window: int | None) -> float:
    """Chunked delta rule per token and value head (chunk C = min(chunk_size, seq_len)): the state reads for
    the pseudo-values and the outputs and the state update, 3 x 2 dk dv, plus the intra-chunk products
    K K^T, Q K^T (2 C dk each) and the chunk attention times values (2 C dv). Linear in seq_len per sequence."""
    g = _gdn(cfg)
    chunk = min(g.chunk_size, seq_len)
    dk, dv = g.key_head_dim, g.value_head_dim
    return g.heads * (6.0 * dk * dv + 2.0 * chunk * (2 * dk + dv))


def _gdn_activations(cfg: ModelConfig, sizes: Any, shape: Any) -> int:
    from framework.models.memory import gdn_activation_bytes

    return gdn_activation_bytes(cfg, sizes, shape)


def _gdn_heads(cfg: ModelConfig) -> dict[str, int]:
    g = _gdn(cfg)
    return {"model.gdn.heads": g.heads, "model.gdn.key_heads": g.resolved_key_heads}


# ------------------------------------------------------------------------------------------ Mamba-2 facts
def _mamba(cfg: ModelConfig) -> Mamba2Config:
    if cfg.mamba2 is None:
        raise ValueError("a mamba2 block needs model.mamba2")
    return cfg.mamba2


def _mamba_matrix_params(cfg: ModelConfig) -> int:
    """in_z, in_x (inner), in_B, in_C (groups x state), in_dt (heads), out_proj (inner -> d)."""
    m, d = _mamba(cfg), cfg.d_model
    return d * (2 * m.inner + 2 * m.groups * m.state_dim + m.heads) + m.inner * d


def _mamba_params(cfg: ModelConfig) -> int:
    """Matrices, conv taps (and biases) over x, B, C, dt_bias, A_log and D per head, the gated norm's gain."""
    m = _mamba(cfg)
    conv_channels = m.inner + 2 * m.groups * m.state_dim
    conv = conv_channels * (m.conv_kernel + int(m.conv_bias))
    return _mamba_matrix_params(cfg) + conv + 3 * m.heads + m.inner


def _mamba_mixing(cfg: ModelConfig, seq_len: int, window: int | None) -> float:
    """Chunked SSD per token and head (chunk C = min(chunk_size, seq_len)): intra-chunk C B^T (2 C N) and its
    product with x (2 C P), the chunk state x B^T (2 P N) and the carried state's readout h C (2 P N)."""
    m = _mamba(cfg)
    chunk = min(m.chunk_size, seq_len)
    p, n = m.head_dim, m.state_dim
    return m.heads * (2.0 * chunk * (n + p) + 4.0 * p * n)


def _mamba_activations(cfg: ModelConfig, sizes: Any, shape: Any) -> int:
    from framework.models.memory import mamba2_activation_bytes

    return mamba2_activation_bytes(cfg, sizes, shape)


def _mamba_heads(cfg: ModelConfig) -> dict[str, int]:
    """Heads, and the B/C groups: the gated norm normalises over a group, so a group must not span ranks."""
    m = _mamba(cfg)
    return {"model.mamba2.heads": m.heads, "model.mamba2.groups": m.groups}


_ATTENTION = Mixer(
    "attention", "attention", _build_attention, "global", _attention_params, attention_matrix_params,
    _attention_mixing, recurrent=False, head_counts=_attention_heads, activation_bytes=_attention_activations,
    input_readers=_attention_readers,
)  # fmt: skip
MIXERS: dict[str, Mixer] = {
    "attention": _ATTENTION,
    "attention_local": dataclasses.replace(_ATTENTION, name="attention_local", context="local"),
    "mla": Mixer(
        "mla",
        "attention",
        _build_mla,
        "global",
        _mla_params,
        _mla_matrix_params,
        _mla_mixing,
        recurrent=False,
        head_counts=lambda cfg: {"model.n_heads": cfg.n_heads},
        activation_bytes=_mla_activations,
        input_readers=lambda cfg: 2 if cfg.mla is None or cfg.mla.q_lora_rank is None else 2,  # wq(_a), wkv_a
    ),  # fmt: skip
    "gdn": Mixer(
        "gdn",
        "gdn",
        _build_gdn,
        "global",
        _gdn_params,
        _gdn_matrix_params,
        _gdn_mixing,
        recurrent=True,
        head_counts=_gdn_heads,
        activation_bytes=_gdn_activations,
        input_readers=lambda cfg: 6,  # wq, wk, wv, wz, wb, wa
    ),  # fmt: skip
    "mamba2": Mixer(
        "mamba2",
        "mamba",
        _build_mamba2,
        "global",
        _mamba_params,
        _mamba_matrix_params,
        _mamba_mixing,
        recurrent=True,
        head_counts=_mamba_heads,
        activation_bytes=_mamba_activations,
        input_readers=lambda cfg: 5,  # in_z, in_x, in_B, in_C, in_dt
    ),  # fmt: skip
}


def mixers_used(cfg: ModelConfig) -> list[Mixer]:
    """The distinct registry entries of the decoder's blocks, in first-use order."""
    return [MIXERS[name] for name in dict.fromkeys(cfg.mixers)]


def mixer_of(cfg: ModelConfig, index: int) -> Mixer:
    """The registry entry of block `index`."""
    return MIXERS[cfg.mixer(index)]


def local_config(cfg: ModelConfig) -> ModelConfig:
    """cfg as attention_local blocks see it: window layers.local_window (else sliding_window), RoPE base
    layers.local_rope_theta (else rope_theta) and no rope scaling when a local theta is set (Gemma 3)."""
    layers = cfg.layers
    if layers is None:
        return cfg
    window = layers.local_window if layers.local_window is not None else cfg.sliding_window
    if layers.local_rope_theta is None:
        return dataclasses.replace(cfg, sliding_window=window)
    return dataclasses.replace(
        cfg, sliding_window=window, rope_theta=layers.local_rope_theta, rope_scaling="none"
    )


def layer_window(cfg: ModelConfig, index: int) -> int | None:
    """The sliding window block `index` attends with (None: every earlier key), for attention mixers."""
    entry = mixer_of(cfg, index)
    if entry.context == "local":
        return local_config(cfg).sliding_window
    if index in (cfg.full_attention_layers or ()):
        return None
    return cfg.sliding_window
