"""Position schemes: RoPE (with linear / Llama-3.1 scaling), ALiBi slopes, sinusoidal and learned tables,
T5 relative-position buckets, and per-document position ids.

Nothing here holds a buffer: RoPE angles and sinusoidal tables are recomputed from the positions in float32 at
each forward, so a meta-device build needs no re-initialisation and bf16 casts never touch them. What is built on
the CPU (RoPE frequencies, ALiBi slopes) is kept per (device, dtype) by a DeviceTable on the module that uses it,
so only the first forward on a device does host work and a host-to-device copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig

# ------------------------------------------------------------------------------------------ device tables


class DeviceTable:
    """A constant table built on the CPU (in float64 where exactness matters, so every device gets the same
    values) the first time a (device, dtype) asks for it, then kept: a later forward builds no CPU tensor and
    copies nothing host-to-device. A plain object held by a module, not a buffer: no state dict entry, not
    touched by `.to(dtype)` or `to_empty`, and each module owns its own (no process-wide cache)."""

    def __init__(self, build: Callable[[], torch.Tensor]) -> None:
        self.build = build
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._tables:
            self._tables[key] = self.build().to(device=device, dtype=dtype)
        return self._tables[key]


# --------------------------------------------------------------------------------------------- position ids


def default_positions(
    batch: int, seq_len: int, device: torch.device, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions [B, S]: 0..S-1, or restarting at 0 at each change of `document_ids` (packed sequences)."""
    idx = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if document_ids is None:
        return idx
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # index of the most recent document start at or before each token
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - last_start


# --------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2 (Su et al. 2021), with cfg.rope_scaling applied; float32 [d // 2], where d is the
    rotated width rope_fraction x head_dim (partial rotary: the frequencies span the rotated channels only, as
    in GPT-NeoX and HF's partial_rotary_factor).

    Computed in float64 on the CPU and then moved, so every device rotates by exactly the same angles."""
    dim = rotary_dim(cfg)
    inv_freq = cfg.rope_theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if cfg.rope_scaling == "linear":
        # position interpolation (Chen et al. 2023): angle(p) = p / factor * freq
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        inv_freq = _llama3_scale(inv_freq, cfg)
    elif cfg.rope_scaling == "yarn":
        inv_freq = _yarn_scale(inv_freq, cfg, dim)
    return inv_freq.float().to(device)


def _yarn_scale(inv_freq: torch.Tensor, cfg: ModelConfig, dim: int) -> torch.Tensor:
    """YaRN's NTK-by-parts (Peng et al. 2023, as transformers' _compute_yarn_parameters): frequencies that turn
    more than beta_fast times over the original context keep their value, fewer than beta_slow times are divided by
    the factor, with a linear ramp over the dimensions between (rounded outward unless rope_yarn_truncate is off)."""
    base, old_len = cfg.rope_theta, cfg.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_yarn_beta_fast), correction_dim(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return inv_freq / cfg.rope_scaling_factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k by its square): m(mscale) / m(mscale_all_dim) with
    m(s) = 0.1 s ln(factor) + 1 when both are set (DeepSeek), else 0.1 ln(factor) + 1; 1 without yarn."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    factor = cfg.rope_scaling_factor

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if cfg.rope_yarn_mscale and cfg.rope_yarn_mscale_all_dim:
        return m(cfg.rope_yarn_mscale) / m(cfg.rope_yarn_mscale_all_dim)
    return m(1.0)


def _llama3_scale(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than L/low are divided by the factor, shorter than L/high kept, and the
    band between interpolated with smooth = (L / wavelen - low) / (high - low)."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(wavelen)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def rotary_dim(cfg: ModelConfig) -> int:
    """Channels of each head that RoPE rotates: the first rope_fraction x head_dim (even by validation); with
    model.mla, MLA's decoupled qk_rope_head_dim (a stack of MLA blocks has no other rotated heads)."""
    if cfg.mla is not None:
        return cfg.mla.qk_rope_head_dim
    return round(cfg.resolved_head_dim * cfg.rope_fraction)


def rope_table(cfg: ModelConfig) -> DeviceTable:
    """rope_inv_freq(cfg) kept per device (the model builds it once; see DeviceTable)."""
    return DeviceTable(functools.partial(rope_inv_freq, cfg))


def rope_angles(
    cfg: ModelConfig, positions: torch.Tensor, table: DeviceTable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, float32 [B, S, 1, head_dim // 2] (the 1 broadcasts over heads).
    `table` (from rope_table) holds inv_freq on the device; without it inv_freq is built and copied anew."""
    inv_freq = rope_inv_freq(cfg, positions.device) if table is None else table.get(positions.device)
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    factor = rope_attention_factor(cfg)
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x [B, S, H, D] by the angle of pair i, i.e. multiply the complex
    number x[2i] + j x[2i+1] by exp(j * angle) (Meta Llama layout; HF's rotate_half layout is a permutation).
    With fewer angles than pairs (partial rotary) only the first 2 x angles channels turn; the rest pass."""
    rotated_width = 2 * cos.shape[-1]
    if rotated_width < x.shape[-1]:
        head, rest = x[..., :rotated_width], x[..., rotated_width:]
        return torch.cat((apply_rope(head, cos, sin), rest), dim=-1)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# -------------------------------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): for n a power of two the geometric sequence 2^(-8/n * (h+1)); else
    the slopes of the closest lower power of two m, then every other slope of 2m (the paper's reference code)."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    lower = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_table(n_heads: int) -> DeviceTable:
    """alibi_slopes(n_heads) kept per device (each ALiBi attention layer builds it once; see DeviceTable)."""
    return DeviceTable(functools.partial(alibi_slopes, n_heads))


# ------------------------------------------------------------------------------------- absolute embeddings


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d)); [..., dim]."""
    inv_freq = 10000.0 ** -(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return table[..., :dim].float()


class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal position table (no parameters); added to the token embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal_table(positions, self.dim)


# ------------------------------------------------------------------------------------ T5 relative buckets


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 bucket of relative_position = key_pos - query_pos (Raffel et al. 2020). Bidirectional: half the
    buckets for keys after the query. Of the rest, half are exact distances 0..n/2-1 and half log-spaced up to
    max_distance, beyond which everything shares the last bucket. Unidirectional: future keys map to 0."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Embedding):
    """T5 relative attention bias: one learned scalar per (bucket, head), shared by every layer of a stack."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__(cfg.relative_buckets, cfg.n_heads)
        self.bidirectional = bidirectional
        self.max_distance = cfg.relative_max_distance
        self.local_view: Callable[[torch.Tensor], torch.Tensor] = _identity
        """Hook: this process's heads (columns) of the table. Tensor parallelism shards it over heads and sets
        this to return the local shard (keeps this file free of torch.distributed), like Attention.local_view."""

    def bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Additive attention bias [B, heads, Sq, Sk] (the local heads under tensor parallelism) from positions
        [B, Sq] and [B, Sk]."""
        relative = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_embeddings, self.max_distance
        )
        return self(buckets).permute(0, 3, 1, 2)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """Bucket ids [...] -> this process's heads' biases [..., heads]."""
        return F.embedding(buckets, self.local_view(self.weight))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
