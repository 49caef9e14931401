"""RMSNorm and LayerNorm against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.config.schema import ModelConfig
from framework.models.norms import RMSNorm, build_norm


def test_rmsnorm_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3 + 1
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    # y = x / sqrt(mean(x^2) + eps) * g  (no mean subtraction, no bias)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_rmsnorm_statistic_in_float32_for_bf16() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 64) * 1e-3).to(torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    expected = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)


def test_layernorm_formula() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(norm="layernorm", d_model=16, norm_eps=1e-6)
    norm = build_norm(cfg)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        norm.bias.copy_(torch.randn(16))
    x = torch.randn(4, 16) * 2 + 3
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize(("kind", "cls"), [("rmsnorm", RMSNorm), ("layernorm", nn.LayerNorm)])
def test_build_norm_kind_dim_and_eps(kind: str, cls: type) -> None:
    cfg = ModelConfig(norm=kind, d_model=24, norm_eps=1e-3)
    norm = build_norm(cfg)
    assert isinstance(norm, cls)
    assert norm.weight.shape == (24,) and norm.eps == 1e-3
    assert build_norm(cfg, 8).weight.shape == (8,)
