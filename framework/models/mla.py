"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; DeepSeek-V3), the `mla` mixer of model.layers.pattern.

Per token x [d_model], with H = model.n_heads heads and model.mla's widths:

    c_kv, k_rope = split(x W_kv_a)            c_kv: kv_lora_rank latent; k_rope: qk_rope_head_dim, one for all heads
    k_nope_h, v_h = split(kv_norm(c_kv) W_kv_b)   per head: qk_nope_head_dim key and v_head_dim value channels
    q_h = [q_nope_h, q_rope_h] = x W_q  or  q_norm(x W_q_a) W_q_b  (q_lora_rank: the query is compressed too)
    k_h = [k_nope_h, RoPE(k_rope)],  q_h = [q_nope_h, RoPE(q_rope_h)]   (decoupled RoPE: only the rope channels turn)
    out = wo(concat_h attention(q_h, k_h, v_h))

The training path expands the latent to full per-head keys and values and runs the same attention as `Attention`
(every mask, document masking, backend and the Ulysses / kernel hooks), with q/k head dim nope + rope and value
head dim v_head_dim, which SDPA and FlexAttention accept (docs/kernels.md). Softmax scale (nope + rope)^-1/2,
times m^2 with m = 0.1 mscale_all_dim ln(factor) + 1 under YaRN rope scaling (DeepSeek-V3's yarn_get_mscale).
RoPE is Loom's pair layout (positions.apply_rope), which is DeepSeek's rope_interleave layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import MLAConfig, ModelConfig
from framework.models.attention import Attention, AttentionContext, _attend_here, _identity
from framework.models.norms import RMSNorm
from framework.models.positions import apply_rope

LATENT_NORM_EPS = 1e-6
"""eps of the latent norms (q_norm, kv_norm): DeepSeek's fixed value (its q_a_layernorm / kv_a_layernorm take no
config eps), whatever model.norm_eps the block norms use."""


def mla_config(cfg: ModelConfig) -> MLAConfig:
    if cfg.mla is None:
        raise ValueError("an mla block needs model.mla")
    return cfg.mla


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's yarn_get_mscale: 0.1 mscale ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-1/2, times yarn_mscale(factor, mscale_all_dim)^2 under yarn rope scaling."""
    scale = mla_config(cfg).qk_head_dim ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_yarn_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.rope_yarn_mscale_all_dim) ** 2
    return scale


class MLA(Attention):
    """MLA with Attention's attention core (masks, backends, hooks). Parameters: `wq` (no q_lora_rank) or
    `wq_a`, `q_norm`, `wq_b`; `wkv_a` (kv_lora_rank + qk_rope_head_dim outputs, the shared rope key last),
    `kv_norm`, `wkv_b` (per head: qk_nope_head_dim key channels, then v_head_dim value channels); `wo`."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        m = mla_config(cfg)
        heads = cfg.n_heads
        self.mla = m
        self.n_heads = heads
        self.head_offset = 0
        self.local_view = _identity
        self.attend_hook = _attend_here
        self.kernel = None
        self.track_logits, self.max_logit = False, None  # QK-clip's probe (Attention)
        self.shared_view: Callable[[torch.Tensor], torch.Tensor] = _identity
        """Hook on the rope key every head shares: tensor parallelism sums its gradient over the tp ranks, whose
        heads each use it (framework/parallel/tensor.py; keeps this file free of torch.distributed)."""
        self.head_dim = m.qk_head_dim
        self.backend = cfg.attention_backend
        self.scale = mla_softmax_scale(cfg)
        self.temperature = 1.0
        self.dropout_p = cfg.attention_dropout
        self.softcap = cfg.attention_softcap
        self.alibi = None
        self.qk_norm_whole = False
        self.k_norm = None
        d = cfg.d_model
        if m.q_lora_rank is None:
            self.wq = nn.Linear(d, heads * m.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, m.q_lora_rank, bias=cfg.bias)
            self.q_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(m.q_lora_rank, heads * m.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.bias)
        self.kv_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.wo = nn.Linear(heads * m.v_head_dim, d, bias=cfg.dense_bias)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D] (self-attention only)."""
        m = self.mla
        q = self._query(x).unflatten(-1, (-1, m.qk_head_dim))  # [B, S, heads, nope + rope]
        latent, k_rope = self.wkv_a(x).split((m.kv_lora_rank, m.qk_rope_head_dim), dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).unflatten(-1, (-1, m.qk_nope_head_dim + m.v_head_dim))
        k_nope, v = kv.split((m.qk_nope_head_dim, m.v_head_dim), dim=-1)
        q_nope, q_rope = q.split((m.qk_nope_head_dim, m.qk_rope_head_dim), dim=-1)
        k_rope = self.shared_view(k_rope).unsqueeze(2)  # [B, S, 1, rope]: one rope key shared by every head
        if ctx.rope is not None:
            q_rope, k_rope = apply_rope(q_rope, *ctx.rope), apply_rope(k_rope, *ctx.rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)), dim=-1)
        out = self.attend_hook(self._attend_mla, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx)
        return self.wo(out.transpose(1, 2).flatten(-2))

    def _attend_mla(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Attention._attend, with the SDPA backend on q, k, v zero-padded to one head width: torch's flash
        kernels take only q, k and v of equal head dims and otherwise fall to the math kernel, which materialises
        the scores (measured on CPU, torch 2.13: 2.8x the time per FLOP of GQA before, benchmarks/frontier.py).
        Zero channels change neither q.k (the scale is explicit) nor the kept value channels."""
        qk, vd = q.shape[-1], v.shape[-1]
        if self.backend != "sdpa" or qk == vd:
            return self._attend(q, k, v, ctx)
        width = max(qk, vd)
        q, k = F.pad(q, (0, width - qk)), F.pad(k, (0, width - qk))
        return self._attend(q, k, F.pad(v, (0, width - vd)), ctx)[..., :vd]

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        wq = getattr(self, "wq", None)
        if wq is not None:
            return wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))
