"""Mamba-2 sequence mixer (Dao & Gu 2024, "Transformers are SSMs", the SSD layer), single-device PyTorch.

Per head h (scalar decay, state [head_dim P, state_dim N]):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t
with A = -exp(A_log) < 0 and dt = softplus(in_dt(u) + dt_bias) > 0, so every decay lies in (0, 1]. B and C come in
G groups, each shared by H / G heads. Documents packed in one row reset the state (and the convolution's window)
at their first token. `naive_ssd` is the recurrence token by token; `chunked_ssd` is the SSD algorithm (section 6
of the paper): a masked quadratic form inside each chunk and a recurrence over chunk states between chunks.

The layer matches transformers' Mamba2Mixer (use_bias False, norm_before_gate False): in_proj split into
[z, x, B, C, dt], a causal depthwise conv + SiLU over x, B and C, the scan, the D skip, the gated RMSNorm
(multiply by silu(z) first, then normalise each of the G groups of inner / G channels) and out_proj.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import Mamba2Config, ModelConfig
from framework.models.attention import AttentionContext
from framework.models.recurrence import RecurrentMixer, causal_depthwise_conv, document_starts

__all__ = ["Mamba2", "causal_depthwise_conv", "document_starts"]

DT_FLOOR = 1e-4
"""Smallest initial dt (mamba_ssm's dt_init_floor), so softplus^-1 stays finite."""
A_INIT_RANGE = (1.0, 16.0)
"""A = -uniform(1, 16) at init (mamba_ssm's A_init_range)."""


# ---------------------------------------------------------------------------------------------------- pure ops


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16 / fp16 / fp32 inputs, float64 for float64 ones (the tests' precise references)."""
    return torch.promote_types(x.dtype, torch.float32)


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, G, N] -> [B, S, H, N]: group g serves heads g*H/G .. (g+1)*H/G - 1 (as HF's repeat_interleave)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def naive_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, in float32 (float64 for float64 x): (y [B, S, H, P] in x's dtype, without
    the D skip; final state [B, H, P, N] in the compute dtype).

    x [B, S, H, P]; dt [B, S, H] (after softplus); A [H] (negative); Bm, Cm [B, S, G, N]; starts [B, S] bool,
    True where a document starts (the state is zeroed before that token); initial_state [B, H, P, N]."""
    b, s, h, p = x.shape
    cd = _compute_dtype(x)
    Bh, Ch = _expand_groups(Bm.to(cd), h), _expand_groups(Cm.to(cd), h)
    x32, dt32 = x.to(cd), dt.to(cd)
    state = x32.new_zeros(b, h, p, Bm.shape[-1]) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(s):
        decay = torch.exp(dt32[:, t] * A.to(cd))  # [B, H]
        if starts is not None:
            decay = decay * (~starts[:, t])[:, None]
        update = (dt32[:, t, :, None] * x32[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay[..., None, None] * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1).to(x.dtype), state


def chunk_decay(dt: torch.Tensor, A: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H] decay (float32, float64 for float64 dt) of a whole span: final(initial) = decay * initial + final(0).

    exp(sum_t dt_t A), or 0 where a document starts inside the span (the carried state is dropped there)."""
    cd = _compute_dtype(dt)
    decay = torch.exp((dt.to(cd) * A.to(cd)).sum(dim=1))
    if starts is not None:
        decay = decay * (~starts.any(dim=1))[:, None]
    return decay


def _decay_matrix(log_a: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
    """M[..., t, s] = exp(sum_{s < u <= t} log_a_u) for s <= t with no reset in (s, t], else 0.

    The exponent is a cumulative sum of the masked terms (HF's segment_sum), not a difference of two running
    sums, which would lose the small exponents next to a large one in float32; masked entries are 0 before exp
    (never -inf), so neither the forward nor the backward meets inf - inf or 0 * inf.
    log_a [..., T]; resets [..., T] bool, broadcastable to log_a."""
    T = log_a.shape[-1]
    u_after_s = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril(-1)  # [u, s]: u > s
    exponent = torch.cumsum(torch.where(u_after_s, log_a[..., :, None], 0.0), dim=-2)  # [t, s]
    seg = torch.cumsum(resets.to(torch.int32), dim=-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=log_a.device).tril()
    valid = causal & (seg[..., :, None] == seg[..., None, :])
    return torch.where(valid, torch.exp(torch.where(valid, exponent, 0.0)), 0.0)


def _sum_after(log_a: torch.Tensor) -> torch.Tensor:
    """[..., s] sum_{u > s} log_a_u, as a reverse running sum (no difference of large running sums)."""
    later = F.pad(log_a[..., 1:], (0, 1))
    return torch.flip(torch.cumsum(torch.flip(later, (-1,)), dim=-1), (-1,))


def _pad_seq(t: torch.Tensor, pad: int, value: float | bool = 0) -> torch.Tensor:
    """Pad dim 1 (the sequence) at the end."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), value)], dim=1)


def chunked_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    chunk_size: int,
    starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_ssd` by the chunked SSD algorithm: (y [B, S, H, P] in x's dtype, final state [B, H, P, N] in the
    compute dtype: float32, or float64 for float64 x).

    Any length: the tail is padded with dt = 0 (decay 1, no input), which leaves y and the final state unchanged.
    Documents: the intra-chunk decay matrix is zero across a reset, the state carried into a chunk reaches only
    its tokens before the chunk's first reset, and a chunk's own end state sums only its last segment."""
    b, s, h, p = x.shape
    n, L = Bm.shape[-1], chunk_size
    pad = (-s) % L
    c = (s + pad) // L
    resets = torch.zeros(b, s, dtype=torch.bool, device=x.device) if starts is None else starts
    cd = _compute_dtype(x)
    resets = _pad_seq(resets, pad, False).view(b, 1, c, L)
    dt32 = _pad_seq(dt.to(cd), pad).view(b, c, L, h)
    xdt = _pad_seq(x.to(cd), pad).view(b, c, L, h, p) * dt32[..., None]
    Bc = _pad_seq(_expand_groups(Bm.to(cd), h), pad).view(b, c, L, h, n)
    Cc = _pad_seq(_expand_groups(Cm.to(cd), h), pad).view(b, c, L, h, n)
    log_a = (dt32 * A.to(cd)).permute(0, 3, 1, 2)  # [B, H, c, L], <= 0

    y_diag = _intra_chunk(xdt, Bc, Cc, log_a, resets)
    chunk_states = _chunk_end_states(xdt, Bc, log_a, resets)
    init = xdt.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(cd)
    start_states, final = _pass_states(chunk_states, init, log_a, resets)
    y_off = _from_carried_state(Cc, start_states, log_a, resets)
    y = (y_diag + y_off).reshape(b, c * L, h, p)[:, :s]
    return y.to(x.dtype), final


def _intra_chunk(xdt, Bc, Cc, log_a, resets) -> torch.Tensor:
    """Diagonal blocks: y_t = sum_{s <= t in the chunk and document} (C_t . B_s) decay(s -> t) dt_s x_s."""
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * _decay_matrix(log_a, resets)
    return torch.einsum("bhcls,bcshp->bclhp", scores, xdt)


def _chunk_end_states(xdt, Bc, log_a, resets) -> torch.Tensor:
    """[B, c, H, P, N] state at each chunk's end from its own tokens (zero carried in), last segment only."""
    seg = torch.cumsum(resets.to(torch.int32), dim=-1)
    to_end = torch.exp(_sum_after(log_a))  # exponent <= 0: no overflow
    to_end = torch.where(seg == seg[..., -1:], to_end, 0.0)
    return torch.einsum("bhcl,bclhn,bclhp->bchpn", to_end, Bc, xdt)


def _pass_states(chunk_states, init, log_a, resets) -> tuple[torch.Tensor, torch.Tensor]:
    """State at each chunk's start [B, c, H, P, N] and the final state: the recurrence over chunks
    H_k = decay_k H_{k-1} + own_k (decay_k = 0 when chunk k holds a reset), run chunk by chunk. Linear in the
    chunk count; the one-matrix form over all chunks (the SSD paper's minimal reference) costs (c + 1)^2 x P x N
    per head, which at 8k tokens and chunk 64 is a quarter of the whole scan's FLOPs."""
    decay = torch.exp(log_a.sum(dim=-1)) * (~resets.any(dim=-1))  # [B, H, c]
    state, starts = init, []
    for k in range(chunk_states.shape[1]):
        starts.append(state)
        state = decay[:, :, k, None, None] * state + chunk_states[:, k]
    return torch.stack(starts, dim=1), state


def _from_carried_state(Cc, start_states, log_a, resets) -> torch.Tensor:
    """Off-diagonal blocks: y_t = exp(sum_{u <= t} log_a_u) C_t . H_start for tokens before the first reset."""
    cum = torch.cumsum(log_a, dim=-1)
    before_reset = torch.cumsum(resets.to(torch.int32), dim=-1) == 0
    from_start = torch.where(before_reset, torch.exp(cum), 0.0)  # [B, H, c, L]
    y = torch.einsum("bclhn,bchpn->bclhp", Cc, start_states)
    return y * from_start.permute(0, 2, 3, 1)[..., None]


def gated_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm (norm_before_gate False): y * silu(z), normalised over each slice of `group_size`
    channels (inner / groups), times weight. Float32 inside, cast to y's dtype before the gain (HF's order)."""
    g = y.float() * F.silu(z.float())
    grouped = g.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * grouped.flatten(-2).to(y.dtype)


ScanFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Mamba2(RecurrentMixer):
    """The Mamba-2 mixer, [B, S, d_model] -> [B, S, d_model], from cfg.mamba2 and cfg.d_model / cfg.norm_eps.

    Parameters are split by logical part (in_z, in_x, in_B, in_C, in_dt, the three convolutions) rather than
    fused as in HF's in_proj / conv1d, so tensor parallelism can shard x, z, dt and the per-head vectors by heads.
    Hooks: see framework/models/recurrence.py (parallel code replaces them); `kernel` (an object with
    `chunk_scan(x, dt, A, Bm, Cm, starts, chunk_size) -> y`, framework/kernels/mamba_ssm.py, CUDA only)."""

    tp_columns = ("in_z", "in_x", "in_B", "in_C", "in_dt")
    tp_per_channel = ("x_conv", "B_conv", "C_conv", "x_conv_bias", "B_conv_bias", "C_conv_bias", "dt_bias",
                      "A_log", "D", "norm_weight")  # fmt: skip
    """Tensor parallelism needs heads and groups divisible by tp: a rank holds whole groups (B, C, the norm)."""
    tp_row = "out_proj"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m, d = cfg.mamba2 if cfg.mamba2 is not None else Mamba2Config(), cfg.d_model
        self.heads, self.head_dim, self.state_dim, self.groups = m.heads, m.head_dim, m.state_dim, m.groups
        self.chunk_size, self.eps = m.chunk_size, cfg.norm_eps
        self.norm_group_size = m.inner // m.groups  # a group's channels; a TP shard holds whole groups
        self.dt_range = (m.dt_min, m.dt_max)
        inner, gn = m.inner, m.groups * m.state_dim
        self.in_z, self.in_x = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
        self.in_B, self.in_C = nn.Linear(d, gn, bias=False), nn.Linear(d, gn, bias=False)
        self.in_dt = nn.Linear(d, m.heads, bias=False)
        for name, channels in (("x", inner), ("B", gn), ("C", gn)):
            self.register_parameter(f"{name}_conv", nn.Parameter(torch.empty(channels, m.conv_kernel)))
            bias = nn.Parameter(torch.zeros(channels)) if m.conv_bias else None
            self.register_parameter(f"{name}_conv_bias", bias)
        self.dt_bias = nn.Parameter(torch.empty(m.heads))
        self.A_log = nn.Parameter(torch.empty(m.heads))
        self.D = nn.Parameter(torch.ones(m.heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.kernel = None
        with torch.no_grad():  # usable without init_weights; init_weights redraws from (seed, name)
            for name, param in self.named_parameters(recurse=False):
                if not param.is_meta:
                    param.copy_(self.initial_value(name, torch.Generator().manual_seed(0)))

    own_init = frozenset(
        ("x_conv", "B_conv", "C_conv", "x_conv_bias", "B_conv_bias", "C_conv_bias", "dt_bias", "A_log", "D",
         "norm_weight")
    )  # fmt: skip
    """Direct parameters drawn by `initial_value` (framework/models/init.py asks the module)."""

    def initial_value(self, name: str, generator: torch.Generator) -> torch.Tensor:
        """Float32 CPU initial value of direct parameter `name` (mamba_ssm's init): A = -uniform(1, 16),
        dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], D = 1, norm gain 1, conv weights
        uniform(+-1/sqrt(K)) (torch's Conv1d default for fan_in K), conv biases 0 (Loom's biases start at 0)."""
        shape = getattr(self, name).shape
        u = torch.rand(shape, generator=generator, dtype=torch.float32)
        if name == "A_log":
            lo, hi = A_INIT_RANGE
            return torch.log(lo + (hi - lo) * u)
        if name == "dt_bias":
            log_lo, log_hi = (math.log(v) for v in self.dt_range)
            dt = torch.exp(log_lo + (log_hi - log_lo) * u).clamp(min=DT_FLOOR)
            return dt + torch.log(-torch.expm1(-dt))  # softplus^-1
        if name in ("D", "norm_weight"):
            return torch.ones(shape)
        if name.endswith("_conv_bias"):
            return torch.zeros(shape)
        bound = 1.0 / math.sqrt(shape[1])
        return (2 * u - 1) * bound

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        # Head and group counts come from the widths (unflatten -1), so a tensor-parallel shard's local heads work.
        starts = self.starts_hook(ctx)
        xs, Bm, Cm = (self._conv(name, proj(x), starts) for name, proj in self._conv_inputs())
        view = self.local_view
        dt = F.softplus(self.in_dt(x).float() + view(self.dt_bias).float())  # [B, S, H], > 0
        A = -torch.exp(view(self.A_log).float())
        xh = xs.unflatten(-1, (-1, self.head_dim))
        Bm, Cm = Bm.unflatten(-1, (-1, self.state_dim)), Cm.unflatten(-1, (-1, self.state_dim))
        y = self.scan_hook(self._scan, xh, dt, A, Bm, Cm, starts=starts)
        y = y.float() + view(self.D).float()[:, None] * xh.float()  # the D skip, on the conv output as in HF
        y = gated_rms_norm(
            y.flatten(-2), self.in_z(x), view(self.norm_weight), self.norm_group_size, self.eps
        )
        return self.out_proj(y.to(x.dtype))

    def _conv_inputs(self) -> tuple[tuple[str, nn.Linear], ...]:
        return (("x", self.in_x), ("B", self.in_B), ("C", self.in_C))

    def _conv(self, name: str, u: torch.Tensor, starts: object) -> torch.Tensor:
        weight, bias = getattr(self, f"{name}_conv"), getattr(self, f"{name}_conv_bias")
        weight, bias = self.local_view(weight), None if bias is None else self.local_view(bias)

        def conv(v: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
            return causal_depthwise_conv(v, weight, bias, s)

        return F.silu(self.conv_hook(conv, u, weight.shape[1] - 1, starts))

    def _scan(self, x, dt, A, Bm, Cm, starts=None, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """(y without the D skip, final state): the CUDA kernel when one is installed, x is on CUDA and no state
        is carried in, else `chunked_ssd`."""
        if self.kernel is not None and x.is_cuda and initial_state is None:
            return self.kernel.chunk_scan(x, dt, A, Bm, Cm, starts, chunk_size=self.chunk_size), None
        return chunked_ssd(x, dt, A, Bm, Cm, self.chunk_size, starts=starts, initial_state=initial_state)

    def transition(self, x, dt, A, Bm, Cm, *, starts: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        """[B, H] decay of the span: final(h0) = decay * h0 + final(0)."""
        return chunk_decay(dt, A, starts)

    @staticmethod
    def apply_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return transition[:, :, None, None] * state.to(transition.dtype)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, state_dim={self.state_dim}, groups={self.groups}, "
            f"chunk_size={self.chunk_size}"
        )
