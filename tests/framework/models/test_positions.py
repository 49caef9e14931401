"""Position schemes against closed forms: RoPE as complex rotation, Llama-3.1 scaling, ALiBi slopes (Press et
al.), sinusoids (Vaswani et al.), T5 buckets against transformers' T5Attention, per-document positions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.t5.modeling_t5 import T5Attention

from framework.config.schema import ModelConfig
from framework.models import build_model
from framework.models.positions import (
    RelativePositionBias,
    alibi_slopes,
    apply_rope,
    default_positions,
    relative_position_bucket,
    rope_angles,
    rope_inv_freq,
    sinusoidal_table,
)

# ------------------------------------------------------------------------------------------------------ RoPE


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]: pair i of channels is the complex number x[2i] + j x[2i+1], multiplied by e^(j p f_i)."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotation = torch.polar(torch.ones(1, dtype=torch.float64), positions.double()[..., None] * inv_freq)
    return torch.view_as_real(pairs * rotation[:, :, None, :]).flatten(-2).float()


def _theta_freqs(theta: float, dim: int) -> torch.Tensor:
    return torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def test_rope_is_complex_rotation_of_pairs() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, head_dim=16, rope_theta=500.0)
    x = torch.randn(2, 7, 3, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [5, 9, 0, 1, 2, 100, 1000]])
    out = apply_rope(x, *rope_angles(cfg, positions))
    torch.testing.assert_close(
        out, _rope_complex(x, positions, _theta_freqs(500.0, 16)), atol=1e-4, rtol=1e-4
    )


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        rq = apply_rope(q, *rope_angles(cfg, torch.tensor([[pq]])))
        rk = apply_rope(k, *rope_angles(cfg, torch.tensor([[pk]])))
        return (rq * rk).sum()

    torch.testing.assert_close(score(3, 1), score(50, 48), atol=1e-4, rtol=1e-4)


def test_rope_linear_scaling_divides_positions() -> None:
    cfg = ModelConfig(d_model=16, n_heads=1, rope_scaling="linear", rope_scaling_factor=4.0)
    expected = _theta_freqs(10000.0, 16) / 4.0
    torch.testing.assert_close(rope_inv_freq(cfg).double(), expected, atol=1e-9, rtol=1e-6)


def _llama3_reference(freq: float, factor: float, low: float, high: float, old_len: int) -> float:
    """Llama 3.1 apply_scaling, one frequency at a time."""
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
        return freq
    if wavelen > old_len / low:
        return freq / factor
    smooth = (old_len / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def test_rope_llama3_scaling_formula() -> None:
    cfg = ModelConfig(
        d_model=128 * 4,
        n_heads=4,
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_seq_len=8192,
    )
    freqs = _theta_freqs(500000.0, 128)
    expected = torch.tensor(
        [_llama3_reference(f.item(), 8.0, 1.0, 4.0, 8192) for f in freqs], dtype=torch.float64
    )
    got = rope_inv_freq(cfg).double()
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)
    # the three regimes are all present: kept, interpolated, divided by the factor
    ratio = got / freqs
    assert (ratio > 0.999).any() and (ratio < 1 / 8 + 1e-6).any() and ((ratio > 0.13) & (ratio < 0.99)).any()


# ----------------------------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize(
    ("heads", "exponents"),
    [
        (8, [1, 2, 3, 4, 5, 6, 7, 8]),  # 2^(-8/n)^(h+1)
        (4, [2, 4, 6, 8]),
        (16, [0.5 * (h + 1) for h in range(16)]),
        # non-powers of two: slopes of 2^floor(log2 n) heads, then every other slope of twice as many heads
        (6, [2, 4, 6, 8, 1, 3]),
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
    ],
)
def test_alibi_slopes_paper(heads: int, exponents: list[float]) -> None:
    expected = torch.tensor([2.0**-e for e in exponents])
    torch.testing.assert_close(alibi_slopes(heads), expected, atol=0, rtol=1e-6)


# -------------------------------------------------------------------------------------------- sinusoidal table


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoidal_table_formula(dim: int) -> None:
    positions = torch.tensor([[0, 1, 5, 63]])
    table = sinusoidal_table(positions, dim)
    for col, p in enumerate(positions[0].tolist()):
        for i in range(dim):
            angle = p / 10000 ** (2 * (i // 2) / dim)
            value = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert table[0, col, i].item() == pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------------------------------------- T5 buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20), (64, 256)])
def test_relative_bucket_matches_transformers(bidirectional: bool, buckets: int, max_distance: int) -> None:
    relative = torch.arange(-400, 401)[None, :] + torch.zeros(2, 1, dtype=torch.long)
    ours = relative_position_bucket(relative, bidirectional, buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_looks_up_bucket_of_key_minus_query(bidirectional: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=4, relative_buckets=8, relative_max_distance=16)
    table = RelativePositionBias(cfg, bidirectional=bidirectional)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1]])
    bias = table.bias(positions, positions)
    assert bias.shape == (1, 4, 6, 6)
    for i in range(6):
        for j in range(6):
            rel = positions[0, j] - positions[0, i]
            bucket = T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=8, max_distance=16
            )
            torch.testing.assert_close(bias[0, :, i, j], table.weight[bucket])


# --------------------------------------------------------------------------------------------- position ids


def test_default_positions_restart_per_document() -> None:
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 3, 3, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]])
    assert torch.equal(default_positions(3, 6, torch.device("cpu"), docs), expected)
    assert torch.equal(default_positions(2, 4, torch.device("cpu")), torch.arange(4).expand(2, 4))


# ------------------------------------------------------------------------------ no host work after the first


class CpuOps(TorchDispatchMode):
    """Records every op that reads or makes a CPU tensor. For a model on an accelerator each is host work, and a
    CPU tensor reaching the model is a host-to-device copy; a meta-device model shows them on a CPU machine."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("position", ["rope", "alibi", "sinusoidal", "learned", "relative_bias", "none"])
def test_a_second_forward_builds_no_cpu_table_and_copies_nothing_to_the_device(position: str) -> None:
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=48, max_seq_len=16,
        position=position,
    )  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    model(ids)  # the first forward may build RoPE frequencies / ALiBi slopes on the CPU once
    with CpuOps() as seen:
        model(ids)
        model(ids[:, :4])  # another length reuses them too
    assert seen.ops == []
