"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm, chosen by `ModelConfig.norm`."""

from __future__ import annotations

import torch
from torch import nn

from framework.config.schema import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: no mean subtraction and no bias (Llama, T5's "T5LayerNorm").

    The statistic is computed in float32 so bf16 activations do not lose the small variance terms.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class OffsetRMSNorm(RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * (1 + weight), weight initialised to 0 (Gemma): the gain is stored as its
    offset from 1. The product is taken in float32 and cast afterwards (transformers' GemmaRMSNorm; Llama's
    RMSNorm casts before multiplying), so a bf16 gain of 1 + w is not rounded twice."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm named by cfg.norm over `dim` features (d_model by default); LayerNorm keeps its bias (BERT)."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return (OffsetRMSNorm if cfg.norm_weight_offset else RMSNorm)(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)
