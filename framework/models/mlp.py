"""Feed-forward blocks: plain 2-matrix MLPs (ReLU, GELU) and gated 3-matrix ones (SwiGLU, GeGLU; Shazeer 2020)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig

GATED = ("swiglu", "geglu")


def activation(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The nonlinearity of cfg.mlp: relu, gelu/geglu -> GELU (erf or tanh form), swiglu -> SiLU."""
    if cfg.mlp == "relu":
        return F.relu
    if cfg.mlp == "swiglu":
        return F.silu
    return partial(F.gelu, approximate=cfg.gelu_approximate)


class FeedForward(nn.Module):
    """Plain: w2(act(w1 x)). Gated: w2(act(w1 x) * w3 x), where w1 is the gate and w3 the up projection."""

    def __init__(self, cfg: ModelConfig, *, hidden: int | None = None) -> None:
        """hidden: the width (default cfg.ffn_hidden; MoE shared experts pass theirs)."""
        super().__init__()
        hidden = hidden if hidden is not None else cfg.ffn_hidden
        self.act = activation(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.dense_bias)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.dense_bias) if cfg.mlp in GATED else None
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.dense_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)
