"""Multi-head attention (MHA / GQA / MQA) with three interchangeable kernels: naive (reference), SDPA, Flex.

Scores, per head h, query i, key j (every backend computes exactly this):

    logit = (cap(scale * q_i . k_j) + bias_h(i, j)) / T_h,   masked logits = -inf,   p = softmax_j(logit)

bias_h(i, j) = T5 relative bias[h, bucket(p_j - p_i)] - (alibi_slope_h + w_h) * |p_i - p_j|, where p are the
position ids, w_h the learned soft distance weight and T_h the fixed or learned (exp(log_temperature))
temperature. cap(s) = c * tanh(s / c) with c = model.attention_softcap (Gemma 2), the identity without one.
With attention sinks (model.attention_sinks, gpt-oss; Xiao et al. 2023) a learned logit sink_h joins every
query's softmax denominator with no value: p_ij = exp(logit_ij) / (sum_k exp(logit_ik) + exp(sink_h)), so a head
can put weight "nowhere". Kernels that return the log-sum-exp L_i of the logits get it exactly by rescaling their
output by Z / (Z + e^sink) = sigmoid(L_i - sink_h) (`rescale_for_sinks`, Flex); SDPA gets it with one extra key
(`sdpa_attention_with_sinks`).
Heads are indexed globally from `head_offset` so a tensor- or context-parallel block of heads keeps its heads'
slopes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from framework.config.schema import ModelConfig
from framework.models.masks import AttentionMask
from framework.models.norms import build_norm
from framework.models.positions import alibi_table, apply_rope

BiasFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionContext"], torch.Tensor]
AttendHook = Callable[[AttendFn, torch.Tensor, torch.Tensor, torch.Tensor, "AttentionContext"], torch.Tensor]
AttendKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "AttentionContext", "KernelCall"], torch.Tensor
]


@dataclass(frozen=True)
class KernelCall:
    """What an injected attention kernel (Attention.kernel) needs besides q/k/v [B, heads, S, D] and the mask."""

    scale: float
    dropout_p: float
    inv_temperature: torch.Tensor | None
    """[heads] 1 / T_h, or None for plain attention (the kernel scales q by it, as sdpa_attention does)."""


@dataclass
class AttentionContext:
    """What every layer of one stack needs for one forward: the mask, the position ids (ALiBi / soft distance),
    RoPE cos/sin and the shared T5 bias. Masks are built on first use and reused by the following layers."""

    mask: AttentionMask = field(default_factory=AttentionMask)
    positions: torch.Tensor | None = None
    """[B, S] position ids of queries and keys (self-attention only)."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    position_bias: torch.Tensor | None = None
    """[B or 1, heads, Sq, Sk] additive T5 relative bias."""
    _cache: dict[str, torch.Tensor | BlockMask] = field(default_factory=dict, repr=False)

    def dense_mask(self, batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [B, 1, Sq, Sk] mask, or None for full attention."""
        if self.mask.is_full:
            return None
        if "dense" not in self._cache:
            self._cache["dense"] = self.mask.dense(batch, q_len, k_len, device)
        return self._cache["dense"]

    def block_mask(self, batch: int, q_len: int, k_len: int, device: torch.device) -> BlockMask | None:
        """FlexAttention block mask, or None for full attention."""
        if self.mask.is_full:
            return None
        if "block" not in self._cache:
            per_batch = self.mask.prefix_lengths is not None or self.mask.q_documents is not None
            b = batch if per_batch else None
            self._cache["block"] = create_block_mask(
                self.mask.mask_mod(), b, None, q_len, k_len, device=device
            )
        return self._cache["block"]


def softmax_scale(cfg: ModelConfig) -> float:
    """inv_sqrt_dk: 1/sqrt(head_dim) (Vaswani et al.); none: 1 (T5 folds it into the init); else the number."""
    if cfg.softmax_scale == "inv_sqrt_dk":
        return cfg.resolved_head_dim**-0.5
    if cfg.softmax_scale == "none":
        return 1.0
    return float(cfg.softmax_scale)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap), about x where |x| << cap (Gemma 2's attention
    and final-logit soft-capping); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D]: kv head g serves query heads g*groups .. g*groups+groups-1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    inv_temperature: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention over q [B, H, Sq, D], k/v [B, Hkv, Sk, D]; materialises the scores. sinks [H]: each
    head's sink logit, one more softmax column whose probability is dropped (no value)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = softcap(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale, cap)
    if bias is not None:
        scores = scores + bias
    if inv_temperature is not None:
        scores = scores * inv_temperature.view(1, -1, 1, 1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    scores = scores.float()
    if sinks is not None:
        sink_column = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    probs = scores.softmax(dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs.type_as(q), p=dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    inv_temperature: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """torch SDPA. A per-head temperature scales q (and the bias) so the kernel keeps a scalar scale;
    is_causal is only passed with no mask and no bias so the flash kernel stays eligible."""
    if inv_temperature is not None:
        q = q * inv_temperature.view(1, -1, 1, 1).to(q.dtype)
        bias = None if bias is None else bias * inv_temperature.view(1, -1, 1, 1)
    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=groups > 1,
    )  # fmt: skip


def sdpa_attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sinks: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    inv_temperature: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention with sinks [H] through plain SDPA, exactly: one more key, prepended, whose logit is sink_h and
    whose value is 0. Its logit comes from one more channel: q's is sink_h / scale, the sink key's 1 (its other
    channels 0), every real key's 0, so the real logits are unchanged. The sink key is visible to every query (a
    True column before the mask; a plain causal mask must be passed dense). v gets the extra channel too (zeros,
    cut from the output): with equal q/k/v widths CPU's flash kernel takes the call, with unequal ones SDPA falls to
    the math kernel, which keeps the [B, H, Sq, Sk] probabilities."""
    if inv_temperature is not None:  # as sdpa_attention scales them, but before the sink channel is added
        q = q * inv_temperature.view(1, -1, 1, 1).to(q.dtype)
        bias = None if bias is None else bias * inv_temperature.view(1, -1, 1, 1)
    batch, heads, q_len, _ = q.shape
    sink_channel = (sinks.float() / scale).to(q.dtype).view(1, heads, 1, 1).expand(batch, heads, q_len, 1)
    q = torch.cat([q, sink_channel], dim=-1)
    sink_key = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3] + 1)
    sink_key[..., -1] = 1.0
    k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)
    width = v.shape[-1]
    v = F.pad(v, (0, k.shape[-1] - width, 1, 0))
    mask = None if mask is None else F.pad(mask, (1, 0), value=True)
    bias = None if bias is None else F.pad(bias, (1, 0))
    return sdpa_attention(q, k, v, scale=scale, mask=mask, bias=bias, dropout_p=dropout_p)[..., :width]


LOGIT_ROWS = 512
"""Query rows per chunk of max_logits: the score block it holds is [B, heads, 512, Sk] in fp32, never [Sq, Sk]."""


@torch.no_grad()
def max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    inv_temperature: torch.Tensor | None,
    mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """[heads] max over the batch and every allowed (i, j) of scale * q_i.k_j / T_h in fp32: the logit W_q and W_k
    control (QK-clip's statistic; softcap and additive biases are not in it). q [B, H, Sq, D], k [B, Hkv, Sk, D]
    with H a multiple of Hkv; mask [B, 1, Sq, Sk] (True = attend) or None; causal: the plain causal mask. Computed
    in chunks of LOGIT_ROWS query rows, beside whichever kernel attends (flash, TE, flex): no full score matrix."""
    batch, heads, q_len, dim = q.shape
    groups = heads // k.shape[1]
    qg = q.float().view(batch, k.shape[1], groups, q_len, dim)
    kf = k.float()
    best = torch.full((heads,), float("-inf"), device=q.device)
    for start in range(0, q_len, LOGIT_ROWS):
        rows = slice(start, min(start + LOGIT_ROWS, q_len))
        scores = torch.einsum("bgrqd,bgkd->bgrqk", qg[:, :, :, rows], kf).flatten(1, 2) * scale
        if inv_temperature is not None:
            scores = scores * inv_temperature.float().view(1, heads, 1, 1)
        allowed = mask[:, :, rows] if mask is not None else None
        if causal:
            qi = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
            allowed = qi >= torch.arange(k.shape[2], device=q.device)[None, :]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best


def rescale_for_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out [B, H, Sq, D] of plain attention and its log-sum-exp lse [B, H, Sq] (natural log) -> the sink softmax's
    output: out * Z / (Z + e^sink_h) = out * sigmoid(lse - sink_h). A fully masked row (lse = -inf) stays 0."""
    weight = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return out * weight.unsqueeze(-1).to(out.dtype)


AttentionPath = Literal["naive", "sdpa", "sdpa_repeat_kv", "flex", "flex_compiled"]


def attention_path(
    backend: str,
    device_type: str,
    *,
    fused_sdpa: bool,
    dropout: bool,
    gqa: bool,
    half: bool,
    capped: bool = False,
    sinks: bool = False,
) -> AttentionPath:
    """Which kernel one attention call runs (docs/kernels.md). `fused_sdpa`: no bias and either no mask or a plain
    causal one, the only calls torch's flash kernel takes (with is_causal, and GQA); `half`: q is fp16 / bf16;
    `capped`: the scores are soft-capped (model.attention_softcap), which no SDPA kernel can do, so such calls run
    compiled FlexAttention (a score_mod) on CUDA and the naive reference where Flex cannot: on CPU (eager Flex
    has no backward there) and with attention dropout. `sinks` (model.attention_sinks): on CUDA compiled
    FlexAttention (its log-sum-exp rescales the output; `rescale_for_sinks`), elsewhere and with dropout SDPA with
    one extra key (`sdpa_attention_with_sinks`, which needs a dense mask).

    On CUDA (torch 2.11) SDPA falls to the math kernel, which materialises fp32 scores [B, H, Sq, Sk], whenever
    neither fused kernel takes the call: flash takes no mask, no bias and no fp32; the memory-efficient kernel
    takes masks, biases, fp32 and dropout but no GQA. So on CUDA every mask or bias goes to compiled FlexAttention
    (block-sparse: masked blocks are skipped, biases are computed per score, nothing S^2 is stored), except with
    attention dropout, which Flex lacks: then KV heads are repeated for the efficient kernel, as they are for a
    plain fp32 GQA call. Elsewhere SDPA takes every call as given (CPU's flash kernel takes GQA and masks), and
    FlexAttention runs compiled except on CPU, where it has no backward and a compile costs ~40 s per shape."""
    if backend == "naive":
        return "naive"
    if backend == "flex":
        return "flex" if device_type == "cpu" else "flex_compiled"
    if capped:
        return "flex_compiled" if device_type == "cuda" and not dropout else "naive"
    if sinks and device_type == "cuda":
        return "flex_compiled" if not dropout else ("sdpa_repeat_kv" if gqa else "sdpa")
    if device_type != "cuda":
        return "sdpa"
    if fused_sdpa:
        return "sdpa" if half or not gqa else "sdpa_repeat_kv"
    if dropout:
        return "sdpa_repeat_kv" if gqa else "sdpa"
    return "flex_compiled"


def device_type(t: torch.Tensor) -> str:
    """The device type attention_path decides by (a seam: tests route CPU tensors as CUDA ones)."""
    return t.device.type


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention under torch.compile, made once per process: only compiled does FlexAttention run as a fused
    kernel; eager it computes the full score matrix. Dynamo recompiles the one function per new shape, dtype or
    score_mod code (its guards), so nothing else needs keying. Inside a compiled block (`parallel.compile`) the
    plain flex_attention is traced into the block's graph instead."""
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    """Self- or cross-attention: wq, wk, wv, wo projections, optional per-head QK-norm, optional learned
    per-head temperature (`log_temperature`) and soft distance weight (`distance_weight`, self-attention)."""

    def __init__(self, cfg: ModelConfig, *, cross: bool = False) -> None:
        super().__init__()
        heads, kv_heads, head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.n_heads = heads
        self.head_offset = 0
        self.local_view: Callable[[torch.Tensor], torch.Tensor] = _identity
        """Hook: this module's heads of a per-head parameter. Tensor parallelism shards log_temperature and
        distance_weight over heads and sets it to return the local shard (keeps this file free of distributed)."""
        self.attend_hook: AttendHook = _attend_here
        """Hook: attend_hook(attend, q, k, v, ctx) runs `attend` on q/k/v [B, heads, S, D] (after RoPE). Context
        parallelism swaps in an all-to-all from sequence shards to head shards and back around it
        (framework/parallel/context.py), keeping this file free of torch.distributed."""
        self.kernel: AttendKernel | None = None
        """Hook: when set, replaces attention_backend for this layer (framework/kernels/te.py installs Transformer
        Engine's DotProductAttention here, keeping this file free of TE). A plain callable, not a module, so the
        state dict and parameter names stay the same whichever kernel runs."""
        self.head_dim = head_dim
        self.track_logits = False
        """Set by QK-clip (framework/train/qk_clip.py): each forward folds its max_logits into `max_logit`."""
        self.max_logit: torch.Tensor | None = None
        """[local heads] running max of max_logits since QK-clip last reset it (None: none recorded)."""
        self.backend = cfg.attention_backend
        self.scale = softmax_scale(cfg)
        self.temperature = cfg.attention_temperature
        self.dropout_p = cfg.attention_dropout
        self.softcap = cfg.attention_softcap
        self.alibi = alibi_table(cfg.n_heads) if cfg.position == "alibi" and not cross else None
        """The global heads' ALiBi slopes, kept per device (None without ALiBi)."""
        self.wq = nn.Linear(cfg.d_model, heads * head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, kv_heads * head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, kv_heads * head_dim, bias=cfg.bias)
        self.wo = nn.Linear(heads * head_dim, cfg.d_model, bias=cfg.dense_bias)  # none in Qwen2 (bias_scope)
        if cfg.attention_gate and not cross:
            # gated attention output (Qwen3-Next): out * sigmoid(x W_g), one gate per channel of every head
            self.wg = nn.Linear(cfg.d_model, heads * head_dim, bias=False)
        # qk_norm_scope projection (OLMo 2): one norm over all heads' channels, applied before the head split
        self.qk_norm_whole = cfg.qk_norm_scope == "projection"
        q_width, k_width = (
            (heads * head_dim, kv_heads * head_dim) if self.qk_norm_whole else (head_dim, head_dim)
        )
        self.q_norm = build_norm(cfg, q_width) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, k_width) if cfg.qk_norm else None
        if cfg.learned_temperature:
            self.log_temperature = nn.Parameter(torch.full((heads,), math.log(cfg.attention_temperature)))
        if cfg.soft_distance_bias and not cross:
            self.distance_weight = nn.Parameter(torch.zeros(heads))
        if cfg.attention_sinks and not cross:
            self.sinks = nn.Parameter(torch.zeros(heads))  # sink_h, a logit (gpt-oss: `self_attn.sinks`)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, memory: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; keys and values come from `memory` [B, Sk, D] for cross-attention."""
        source = x if memory is None else memory
        q, k = self.wq(x), self.wk(source)
        if self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim))
        v = self.wv(source).unflatten(-1, (-1, self.head_dim))
        if not self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        out = self.attend_hook(self._attend, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx)
        out = out.transpose(1, 2).flatten(-2)
        gate = getattr(self, "wg", None)
        if gate is not None:
            out = out * torch.sigmoid(gate(x))
        return self.wo(out)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        bias_fn = self._bias_fn(ctx, heads)
        inv_temperature = self._inv_temperature(heads, q.device)
        dropout_p = self.dropout_p if self.training else 0.0
        sinks = self._sinks()
        if self.track_logits:
            self._record_max_logit(q, k, ctx, inv_temperature)
        if self.kernel is not None:
            if bias_fn is not None:
                raise NotImplementedError("an injected kernel takes no score bias (ALiBi, T5, distance)")
            if self.softcap is not None or sinks is not None:
                raise NotImplementedError("an injected kernel takes no attention_softcap or attention_sinks")
            return self.kernel(q, k, v, ctx, KernelCall(self.scale, dropout_p, inv_temperature))
        causal = ctx.mask.is_plain_causal and q_len == k_len
        path = attention_path(
            self.backend,
            device_type(q),
            fused_sdpa=bias_fn is None and (ctx.mask.is_full or causal),
            dropout=dropout_p > 0,
            gqa=k.shape[1] != heads,
            half=q.dtype in (torch.float16, torch.bfloat16),
            capped=self.softcap is not None,
            sinks=sinks is not None,
        )
        if path in ("flex", "flex_compiled"):
            block_mask = ctx.block_mask(batch, q_len, k_len, q.device)
            # inside a compiled block (parallel.compile) flex_attention is traced into the block's own graph
            eager = path == "flex" or torch.compiler.is_compiling()
            flex = flex_attention if eager else compiled_flex_attention()
            if sinks is None:
                return self._flex(flex, q, k, v, block_mask, bias_fn, inv_temperature, dropout_p)
            out, lse = self._flex(flex, q, k, v, block_mask, bias_fn, inv_temperature, dropout_p, lse=True)
            return rescale_for_sinks(out, lse, sinks)
        if path == "sdpa_repeat_kv":  # the kernels that take this call (efficient, cuDNN) have no GQA
            k, v = repeat_kv(k, heads // k.shape[1]), repeat_kv(v, heads // k.shape[1])
        bias = None if bias_fn is None else bias_fn(*_dense_indices(batch, heads, q_len, k_len, q.device))
        kwargs = dict(scale=self.scale, bias=bias, inv_temperature=inv_temperature, dropout_p=dropout_p)
        if path != "naive" and bias is None and causal and sinks is None:
            return sdpa_attention(q, k, v, is_causal=True, **kwargs)  # no mask built: it would be S^2
        mask = ctx.dense_mask(batch, q_len, k_len, q.device)
        if path == "naive":
            return naive_attention(q, k, v, mask=mask, cap=self.softcap, sinks=sinks, **kwargs)
        if sinks is not None:
            return sdpa_attention_with_sinks(q, k, v, mask=mask, sinks=sinks, **kwargs)
        return sdpa_attention(q, k, v, mask=mask, **kwargs)

    def _record_max_logit(
        self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, inv_temperature: torch.Tensor | None
    ) -> None:
        q_len, k_len = q.shape[2], k.shape[2]
        causal = ctx.mask.is_plain_causal and q_len == k_len
        mask = None if causal else ctx.dense_mask(q.shape[0], q_len, k_len, q.device)
        found = max_logits(q, k, self.scale, inv_temperature, mask, causal)
        self.max_logit = found if self.max_logit is None else torch.maximum(self.max_logit, found)

    def _flex(
        self,
        flex: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_mask: BlockMask | None,
        bias_fn: BiasFn | None,
        inv_temperature: torch.Tensor | None,
        dropout_p: float,
        *,
        lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """flex(q, k, v) with this module's score_mod; with `lse` also the log-sum-exp [B, H, Sq] (natural log)."""
        if dropout_p > 0:
            raise NotImplementedError("FlexAttention has no attention dropout; use attention_backend sdpa")
        score_mod = None
        cap = self.softcap
        if bias_fn is not None or inv_temperature is not None or cap is not None:

            def score_mod(score, b, h, q_idx, k_idx):  # noqa: ANN001, ANN202 (flex callback)
                score = softcap(score, cap)  # flex has already multiplied by scale
                if bias_fn is not None:
                    score = score + bias_fn(b, h, q_idx, k_idx)
                return score if inv_temperature is None else score * inv_temperature[h]

        groups = q.shape[1] // k.shape[1]
        out = flex(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scale, enable_gqa=groups > 1,
            return_aux=AuxRequest(lse=True) if lse else None,
        )  # fmt: skip
        return (out[0], out[1].lse) if lse else out

    def _sinks(self) -> torch.Tensor | None:
        """sink_h of the local heads, fp32 (None without attention sinks)."""
        sinks = getattr(self, "sinks", None)
        return None if sinks is None else self.local_view(sinks).float()

    def _inv_temperature(self, heads: int, device: torch.device) -> torch.Tensor | None:
        """1 / T_h per local head; None when it is exactly 1 (plain attention)."""
        log_t = getattr(self, "log_temperature", None)
        if log_t is not None:
            return torch.exp(-self.local_view(log_t).float())
        if self.temperature == 1.0:
            return None
        return torch.full((heads,), 1.0 / self.temperature, device=device)

    def _bias_fn(self, ctx: AttentionContext, heads: int) -> BiasFn | None:
        """bias_h(b, i, j) as a function of index tensors (dense broadcast or Flex scalars); None if zero."""
        terms: list[BiasFn] = []
        if ctx.position_bias is not None:
            terms.append(_table_bias(self._local_heads(ctx.position_bias, heads)))
        distance_coef = self._distance_coefficient(heads)
        if distance_coef is not None and ctx.positions is not None:
            terms.append(_distance_bias(ctx.positions, distance_coef))
        if not terms:
            return None
        return lambda b, h, q, k: sum(term(b, h, q, k) for term in terms)

    def _distance_coefficient(self, heads: int) -> torch.Tensor | None:
        """alibi_slope_h + w_h (both multiply -|p_i - p_j|) for the local heads; None when neither is used."""
        coef = getattr(self, "distance_weight", None)
        coef = None if coef is None else self.local_view(coef).float()
        if self.alibi is not None:
            # slopes of the global heads head_offset .. head_offset + heads - 1
            slopes = self.alibi.get(self.wq.weight.device)[self.head_offset : self.head_offset + heads]
            coef = slopes if coef is None else coef + slopes
        return coef

    def _local_heads(self, bias: torch.Tensor, heads: int) -> torch.Tensor:
        """This module's heads of a [B, all heads, Sq, Sk] bias (unchanged when it is already local)."""
        return bias if bias.shape[1] == heads else bias.narrow(1, self.head_offset, heads)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _attend_here(
    attend: AttendFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
) -> torch.Tensor:
    return attend(q, k, v, ctx)


def _dense_indices(
    batch: int, heads: int, q_len: int, k_len: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Index tensors shaped to broadcast to [B, H, Sq, Sk]."""
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        torch.arange(q_len, device=device).view(1, 1, -1, 1),
        torch.arange(k_len, device=device).view(1, 1, 1, -1),
    )


def _table_bias(table: torch.Tensor) -> BiasFn:
    """Look up a materialised [B or 1, H, Sq, Sk] bias (batch 1 broadcasts)."""
    shared = table.shape[0] == 1
    return lambda b, h, q, k: table[torch.zeros_like(b) if shared else b, h, q, k]


def _distance_bias(positions: torch.Tensor, coef: torch.Tensor) -> BiasFn:
    """-coef_h * |p_i - p_j| (ALiBi, Press et al. 2022; symmetric in encoders)."""
    return lambda b, h, q, k: -coef[h] * (positions[b, q] - positions[b, k]).abs().float()
