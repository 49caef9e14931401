"""Feed-forward blocks against their formulas (written with explicit matmuls, erf/tanh and sigmoid)."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config.schema import ModelConfig
from framework.models.mlp import FeedForward


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * (1 / (1 + torch.exp(-x)))


ACTS = {
    ("relu", "none"): lambda x: x.clamp(min=0),
    ("gelu", "none"): _gelu_erf,
    ("gelu", "tanh"): _gelu_tanh,
    ("swiglu", "none"): _silu,
    ("geglu", "none"): _gelu_erf,
    ("geglu", "tanh"): _gelu_tanh,
}


@pytest.mark.parametrize(("mlp", "approx"), list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_feed_forward_formula(mlp: str, approx: str, bias: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, ffn_hidden=24, mlp=mlp, gelu_approximate=approx, bias=bias)
    ffn = FeedForward(cfg)
    if bias:
        with torch.no_grad():
            for p in ffn.parameters():
                p.normal_()
    x = torch.randn(2, 3, 16)
    act = ACTS[(mlp, approx)]
    hidden = act(_linear(x, ffn.w1))
    if mlp in ("swiglu", "geglu"):
        hidden = hidden * _linear(x, ffn.w3)  # gate(x W1) * (x W3)  (Shazeer 2020)
    torch.testing.assert_close(ffn(x), _linear(hidden, ffn.w2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mlp", "matrices"), [("relu", 2), ("gelu", 2), ("swiglu", 3), ("geglu", 3)])
def test_feed_forward_shapes(mlp: str, matrices: int) -> None:
    ffn = FeedForward(ModelConfig(d_model=8, ffn_hidden=12, mlp=mlp))
    weights = {n: tuple(p.shape) for n, p in ffn.named_parameters()}
    expected = {"w1.weight": (12, 8), "w2.weight": (8, 12)}
    if matrices == 3:
        expected["w3.weight"] = (12, 8)
    assert weights == expected


def test_clamped_swiglu_formula() -> None:
    """gpt-oss: gate clamped above at limit, up to [-limit, limit]; gate * sigmoid(alpha gate) * (up + 1)."""
    torch.manual_seed(0)
    ffn = FeedForward(ModelConfig(d_model=16, ffn_hidden=24, mlp="clamped_swiglu", swiglu_limit=1.5))
    x = 3 * torch.randn(2, 3, 16)
    gate, up = _linear(x, ffn.w1), _linear(x, ffn.w3)
    assert (gate > 1.5).any() and (up < -1.5).any()  # both clamps bind somewhere
    gate, up = (
        torch.minimum(gate, torch.tensor(1.5)),
        torch.maximum(torch.minimum(up, torch.tensor(1.5)), -1.5 * torch.ones(())),
    )
    hidden = gate / (1 + torch.exp(-1.702 * gate)) * (up + 1)
    torch.testing.assert_close(ffn(x), _linear(hidden, ffn.w2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["swiglu_limit", "swiglu_alpha"])
def test_clamped_swiglu_needs_positive_constants(key: str) -> None:
    from framework.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        ModelConfig(mlp="clamped_swiglu", **{key: 0.0}).validate()
    assert err.value.key == f"model.{key}" and err.value.fix
