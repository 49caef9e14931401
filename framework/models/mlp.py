"""Feed-forward blocks: plain 2-matrix MLPs (ReLU, GELU) and gated 3-matrix ones (SwiGLU, GeGLU; Shazeer 2020;
gpt-oss's clamped SwiGLU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig

GATED = ("swiglu", "geglu", "clamped_swiglu")
Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(gate pre-activation w1 x, up projection w3 x) -> the hidden state w2 reads."""


def activation(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The nonlinearity of cfg.mlp: relu, gelu/geglu -> GELU (erf or tanh form), swiglu -> SiLU."""
    if cfg.mlp == "relu":
        return F.relu
    if cfg.mlp in ("swiglu", "clamped_swiglu"):
        return F.silu
    return partial(F.gelu, approximate=cfg.gelu_approximate)


def gated_unit(cfg: ModelConfig) -> Glu:
    """act(gate) * up, or gpt-oss's clamped SwiGLU: gate clamped to <= limit, up to [-limit, limit], then
    gate * sigmoid(alpha * gate) * (up + 1) (transformers' GptOssExperts._apply_gate)."""
    if cfg.mlp != "clamped_swiglu":
        act = activation(cfg)
        return lambda gate, up: act(gate) * up
    return partial(clamped_swiglu, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, *, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's gated unit: the clamps bound the activations of the very wide experts (alpha 1.702, limit 7)."""
    gate = gate.clamp(max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1)


class FeedForward(nn.Module):
    """Plain: w2(act(w1 x)). Gated: w2(glu(w1 x, w3 x)), where w1 is the gate and w3 the up projection."""

    def __init__(self, cfg: ModelConfig, *, hidden: int | None = None) -> None:
        """hidden: the width (default cfg.ffn_hidden; MoE shared experts pass theirs)."""
        super().__init__()
        hidden = hidden if hidden is not None else cfg.ffn_hidden
        self.act = activation(cfg)
        self.glu = gated_unit(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.dense_bias)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.dense_bias) if cfg.mlp in GATED else None
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.dense_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(self.act(self.w1(x)))
        return self.w2(self.glu(self.w1(x), self.w3(x)))
