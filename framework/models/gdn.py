"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), the linear-attention mixer of
Qwen3-Next, as single-device PyTorch.

Each value head h keeps a state S in R^{dk x dv}. Per token t (q, k l2-normalised, q scaled by dk^-1/2):

    S'    = exp(g_t) S_{t-1}                  g_t <= 0: log decay
    u_t   = beta_t (v_t - S'^T k_t)           the delta rule's correction of what S' recalls for k_t
    S_t   = S' + k_t u_t^T
    o_t   = S_t^T q_t

Documents packed into one row are independent: the state is zeroed before each document's first token
(`starts`). `naive_gated_delta_rule` runs the recurrence token by token (the reference); `chunked_gated_delta_rule`
is the chunked WY form used for training (same numbers, matmuls instead of a Python loop over tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import GDNConfig, ModelConfig
from framework.models.attention import AttentionContext
from framework.models.recurrence import RecurrentMixer, causal_depthwise_conv, document_starts

__all__ = ["GatedDeltaNet", "causal_depthwise_conv", "document_starts"]

ScanFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ConvFn = Callable[..., torch.Tensor]

L2_EPS = 1e-6
"""As transformers' / FLA's l2norm: x * rsqrt(sum x^2 + eps)."""


# ----------------------------------------------------------------------------------------------------------------
# The recurrence, token by token (reference)


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (FLA's and transformers' l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, use_qk_l2norm: bool):
    """float32 (float64 stays) copies in [B, H, S, D] layout, q and k normalised, q scaled by dk^-1/2."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(dtype) for x in (g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def _initial(initial_state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The state before the first token, [B, H, dk, dv] in the compute dtype (zeros when none is given)."""
    b, h, _, dk = k.shape
    if initial_state is None:
        return torch.zeros(b, h, dk, v.shape[-1], dtype=v.dtype, device=v.device)
    return initial_state.to(v.dtype)


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule (transformers' torch_recurrent_gated_delta_rule plus document resets).

    q, k [B, S, H, dk] (already repeated to the value heads), v [B, S, H, dv], g, beta [B, S, H]; starts [B, S]
    bool: the state is zeroed before every True token (so initial_state is used only by rows whose first token is
    not a start). Returns o [B, S, H, dv] in v.dtype and the final state [B, H, dk, dv] in float32."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    state, outs = _initial(initial_state, k, v), []
    for t in range(q.shape[2]):
        if starts is not None:
            state = state * (~starts[:, t]).to(state.dtype)[:, None, None, None]
        state = state * g[:, :, t].exp()[..., None, None]
        kv_mem = (state * k[:, :, t, :, None]).sum(-2)  # S'^T k_t
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(-2))  # S_t^T q_t
    return torch.stack(outs, 1).to(out_dtype), state


# ----------------------------------------------------------------------------------------------------------------
# The chunked WY form
#
# Inside a chunk of C tokens with cumulative log decay G_t = g_0 + ... + g_t and carried-in state S_0, unrolling the
# recurrence gives, with D_tj = exp(G_t - G_j) when t, j are in the same document (0 otherwise) and c_t = 1 when no
# document starts at or before t in the chunk (the carried state still reaches t):
#
#   S'_t = c_t exp(G_t) S_0 + sum_{j<t} D_tj k_j u_j^T
#   u_t  = beta_t v_t - beta_t c_t exp(G_t) S_0^T k_t - sum_{j<t} beta_t D_tj (k_t.k_j) u_j
#
# so (I + A) U = beta V - diag(beta c exp(G)) K S_0 with A_tj = beta_t D_tj k_t.k_j strictly lower triangular, i.e.
#   U = Uv - W S_0,   Uv = (I + A)^-1 (beta V),   W = (I + A)^-1 diag(beta c exp(G)) K          (WY form)
#   O = diag(c exp(G)) Q S_0 + (D o Q K^T)_{j<=t} U
#   S_end = c_last exp(G_last) S_0 + sum_{j in last document} exp(G_last - G_j) k_j u_j^T
# All exponents are <= 0 where kept; masked entries are zeroed before exp, so nothing overflows or becomes NaN.


def _pad_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, H, S, ...] -> [B, H, N, C, ...], zero-padded at the end (pad tokens: k = v = beta = g = 0, no-ops)."""
    s = x.shape[2]
    n = -(-s // chunk)
    pad = [0, 0] * (x.dim() - 3) + [0, n * chunk - s]
    return F.pad(x, pad).reshape(*x.shape[:2], n, chunk, *x.shape[3:])


def _chunk_starts(starts: torch.Tensor | None, b: int, s: int, chunk: int, device) -> torch.Tensor:
    """starts [B, S] -> [B, 1, N, C] bool (broadcast over heads); pad tokens never start a document."""
    if starts is None:
        starts = torch.zeros(b, s, dtype=torch.bool, device=device)
    return _pad_chunks(starts[:, None].float(), chunk) > 0.5


class _ChunkTerms(NamedTuple):
    """What the outputs and the state pass share, per chunk ([B, H, N, C, ...]; N chunks of C tokens)."""

    kc: torch.Tensor  # K, chunked
    bc: torch.Tensor  # beta
    G: torch.Tensor  # cumulative log decay inside the chunk
    carry: torch.Tensor  # c_t: 1 while the carried-in state still reaches token t
    decay: torch.Tensor  # D [.., C, C], zero across documents and above the diagonal
    i_plus_a: torch.Tensor  # I + A, unit lower triangular
    w: torch.Tensor  # W = (I + A)^-1 diag(beta c exp(G)) K
    kd: torch.Tensor  # rows exp(G_last - G_j) k_j for j in the chunk's last document, else 0
    end_decay: torch.Tensor  # c_last exp(G_last): how much of S_0 survives the chunk [B, H, N]


def _chunk_terms(k, g, beta, starts, chunk: int) -> _ChunkTerms:
    """The per-chunk terms of the WY form (formulas above) from k, g, beta in [B, H, S, ...] layout."""
    b, _, s, _ = k.shape
    kc, gc, bc = _pad_chunks(k, chunk), _pad_chunks(g, chunk), _pad_chunks(beta, chunk)
    seg = _chunk_starts(starts, b, s, chunk, k.device).long().cumsum(-1)  # document index; 0 = carried-in one
    carry = (seg == 0).to(k.dtype)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    keep = (seg[..., :, None] == seg[..., None, :]) & lower  # j <= t in the same document
    G = gc.cumsum(-1)
    # D_tj = exp(G_t - G_j) on kept entries; the exponent is zeroed first so masked (t < j) entries cannot overflow
    decay = torch.where(keep, G[..., :, None] - G[..., None, :], 0.0).exp() * keep
    eye = torch.eye(chunk, dtype=k.dtype, device=k.device)
    i_plus_a = eye + bc[..., :, None] * decay * (kc @ kc.transpose(-1, -2)) * (1 - eye)  # A strictly lower
    w = _solve(i_plus_a, (bc * carry * G.exp())[..., None] * kc)
    last_doc = seg == seg[..., -1:]
    kd = (torch.where(last_doc, G[..., -1:] - G, 0.0).exp() * last_doc)[..., None] * kc
    end_decay = carry[..., -1] * G[..., -1].exp()
    return _ChunkTerms(kc, bc, G, carry, decay, i_plus_a, w, kd, end_decay)


def _solve(unit_lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 rhs by forward substitution (differentiable)."""
    return torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True)


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule in chunks of chunk_size tokens (WY form, see the formulas above); same arguments and
    results as `naive_gated_delta_rule`. Any sequence length (padded internally); documents may start anywhere."""
    out_dtype, s = v.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
    t = _chunk_terms(k, g, beta, starts, chunk_size)
    qc, vc = _pad_chunks(q, chunk_size), _pad_chunks(v, chunk_size)
    uv = _solve(t.i_plus_a, t.bc[..., None] * vc)
    qg = (t.carry * t.G.exp())[..., None] * qc  # diag(c exp(G)) Q
    attn = t.decay * (qc @ t.kc.transpose(-1, -2))  # (D o Q K^T), j <= t
    state, outs = _initial(initial_state, k, v), []
    # unbind, not x[:, :, n]: each select's backward writes a zero tensor of the whole input, which made the
    # backward quadratic in the number of chunks (unbind's backward is one stack)
    per_chunk = (x.unbind(2) for x in (uv, t.w, qg, attn, t.end_decay, t.kd))
    for uv_n, w_n, qg_n, attn_n, decay_n, kd_n in zip(*per_chunk, strict=True):
        u = uv_n - w_n @ state
        outs.append(qg_n @ state + attn_n @ u)
        state = decay_n[..., None, None] * state + kd_n.transpose(-1, -2) @ u
    o = torch.cat(outs, 2)[:, :, :s]
    return o.transpose(1, 2).to(out_dtype), state


def chunk_state_transition(
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    starts: torch.Tensor | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """M [B, H, dk, dk] with final_state(S_0) = M @ S_0 + final_state(0) over the whole sequence.

    The state update is affine in S_0; per chunk S_end = (c_last exp(G_last) I - Kd^T W) S_0 + Kd^T Uv, so M is the
    product of the chunks' linear parts, last chunk leftmost (context parallelism chains ranks with it)."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    k, g, beta = (x.transpose(1, 2).to(dtype) for x in (k, g, beta))
    if use_qk_l2norm:
        k = l2norm(k)
    t = _chunk_terms(k, g, beta, starts, chunk_size)
    eye = torch.eye(k.shape[-1], dtype=dtype, device=k.device)
    m = eye.expand(*k.shape[:2], -1, -1)
    for decay_n, kd_n, w_n in zip(t.end_decay.unbind(2), t.kd.unbind(2), t.w.unbind(2), strict=True):
        m = (decay_n[..., None, None] * eye - kd_n.transpose(-1, -2) @ w_n) @ m  # unbind: see above
    return m


# ----------------------------------------------------------------------------------------------------------------
# Causal depthwise convolution


# ----------------------------------------------------------------------------------------------------------------
# The module


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3NextRMSNormGated: weight * (x / rms(x) in fp32, back to x.dtype) * silu(gate in fp32)
    (float64 stays float64)."""
    dtype, wide = x.dtype, torch.promote_types(x.dtype, torch.float32)
    xf = x.to(wide)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(dtype) * F.silu(gate.to(wide))).to(dtype)


class GatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet sequence mixer (Qwen3-Next linear attention), `model.gdn`.

    x -> q, k (key heads), v, z (value heads), b, a (one per value head); q, k, v pass a causal depthwise conv and
    SiLU; beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias); the gated delta rule per value head (key heads
    repeated to value heads); gated RMSNorm with z per value head; wo. model.gdn null means GDNConfig's defaults.
    Head counts are read from the tensors, so a tensor-parallel shard (fewer heads) runs the same code. Hooks: see
    framework/models/recurrence.py; `kernel` = a scan for CUDA tensors (framework/kernels/fla.py), None = the
    PyTorch chunked op."""

    tp_columns = ("wq", "wk", "wv", "wz", "wb", "wa")
    tp_per_channel = ("q_conv", "k_conv", "v_conv", "A_log", "dt_bias")
    tp_row = "wo"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        gdn, d = cfg.gdn if cfg.gdn is not None else GDNConfig(), cfg.d_model
        self.heads, self.key_heads = gdn.heads, gdn.resolved_key_heads
        self.dk, self.dv, self.chunk_size, self.eps = (
            gdn.key_head_dim,
            gdn.value_head_dim,
            gdn.chunk_size,
            cfg.norm_eps,
        )
        key_dim, value_dim = self.key_heads * self.dk, self.heads * self.dv
        self.wq = nn.Linear(d, key_dim, bias=False)
        self.wk = nn.Linear(d, key_dim, bias=False)
        self.wv = nn.Linear(d, value_dim, bias=False)
        self.wz = nn.Linear(d, value_dim, bias=False)
        self.wb = nn.Linear(d, self.heads, bias=False)
        self.wa = nn.Linear(d, self.heads, bias=False)
        self.q_conv = nn.Parameter(torch.empty(key_dim, gdn.conv_kernel))
        self.k_conv = nn.Parameter(torch.empty(key_dim, gdn.conv_kernel))
        self.v_conv = nn.Parameter(torch.empty(value_dim, gdn.conv_kernel))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.norm_weight = nn.Parameter(torch.ones(self.dv))
        self.wo = nn.Linear(value_dim, d, bias=False)
        self.kernel: ScanFn | None = None
        with torch.no_grad():
            for name, param in self.named_parameters(recurse=False):
                param.copy_(initial_value(name, param.shape, torch.Generator().manual_seed(0)))

    own_init = frozenset(("A_log", "dt_bias", "q_conv", "k_conv", "v_conv", "norm_weight"))
    """Direct parameters drawn by `initial_value` (framework/models/init.py asks the module)."""

    def initial_value(self, name: str, generator: torch.Generator) -> torch.Tensor:
        return initial_value(name, getattr(self, name).shape, generator)

    def scan_fn(self, q: torch.Tensor) -> ScanFn:
        """The chunked op, or `kernel` when one is installed and the tensors are on CUDA."""
        if self.kernel is not None and q.is_cuda:
            return self.kernel
        return functools.partial(chunked_gated_delta_rule, chunk_size=self.chunk_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        starts = self.starts_hook(ctx)
        q, k, v = self._conv_qkv(x, starts)
        groups = self.heads // self.key_heads  # value heads per key head (the same on every tp shard)
        q = q.reshape(b, s, -1, self.dk).repeat_interleave(groups, dim=2)
        k = k.reshape(b, s, -1, self.dk).repeat_interleave(groups, dim=2)
        v = v.reshape(b, s, -1, self.dv)
        beta = self.wb(x).sigmoid()
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32 decays even in bf16 (HF: A might be -inf)
        a_log, dt_bias = self.local_view(self.A_log), self.local_view(self.dt_bias)
        g = -a_log.to(wide).exp() * F.softplus(self.wa(x).to(wide) + dt_bias)
        o = self.scan_hook(self.scan_fn(q), q, k, v, g, beta, starts=starts)
        z = self.wz(x).reshape(b, s, -1, self.dv)
        return self.wo(gated_rms_norm(o, z, self.shared_view(self.norm_weight), self.eps).reshape(b, s, -1))

    def _conv_qkv(self, x: torch.Tensor, starts: object) -> tuple[torch.Tensor, ...]:
        """One depthwise conv over the concatenated q, k, v channels (as transformers), then SiLU."""
        parts = [self.wq(x), self.wk(x), self.wv(x)]
        weight = torch.cat([self.local_view(w) for w in (self.q_conv, self.k_conv, self.v_conv)], 0)
        conv = functools.partial(_conv, weight)
        qkv = F.silu(self.conv_hook(conv, torch.cat(parts, -1), weight.shape[1] - 1, starts))
        return qkv.split([p.shape[-1] for p in parts], -1)

    def transition(self, q, k, v, g, beta, *, starts: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        """M [B, H, dk, dk]: final(S0) = M @ S0 + final(0) (q and v do not enter the linear part)."""
        return chunk_state_transition(k, g, beta, starts, chunk_size=self.chunk_size)

    @staticmethod
    def apply_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return transition @ state.to(transition.dtype)


def _conv(weight: torch.Tensor, x: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    return causal_depthwise_conv(x, weight, None, starts)


# ----------------------------------------------------------------------------------------------------------------
# Initial values of the parameters that are not plain matrices (framework/models/init.py draws them by name)

DT_MIN, DT_MAX, A_MIN, A_MAX = 1e-3, 1e-1, 1.0, 16.0


def initial_value(param_name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Initial value of GatedDeltaNet parameter `param_name` (its own name, no module prefix), float32 CPU.

    A_log = log A, A ~ U(1, 16) (FLA / Mamba-2); dt_bias = softplus^-1(dt), log dt ~ U(log 1e-3, log 1e-1), so
    softplus(a + dt_bias) starts as a typical step size; conv weights ~ U(+-1/sqrt(K)) (nn.Conv1d's default for a
    depthwise conv, fan_in = K); norm_weight = 1; projections N(0, 0.02) (init.py overrides them by group)."""
    u = torch.rand(shape, generator=generator)
    if param_name == "A_log":
        return (A_MIN + (A_MAX - A_MIN) * u).log()
    if param_name == "dt_bias":
        dt = (math.log(DT_MIN) + (math.log(DT_MAX) - math.log(DT_MIN)) * u).exp()
        return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1)
    if param_name.endswith("_conv"):
        bound = 1.0 / math.sqrt(shape[-1])
        return (2 * u - 1) * bound
    if param_name == "norm_weight":
        return torch.ones(shape)
    raise KeyError(f"no GatedDeltaNet initial value for {param_name!r}")
