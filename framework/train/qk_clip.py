"""QK-clip (Kimi K2's MuonClip, Kimi Team 2025): after each optimizer step, shrink each attention head's query and
key weights when its largest logit on the step exceeded tau (optim.qk_clip), so attention logits cannot grow
without bound (the failure Muon makes more likely at scale).

For head h with max logit S_h over the step (scale * q.k / T_h, from framework/models/attention.py's max_logits
probe in every forward: chunked, beside the attention kernel, never a second forward) and gamma_h = min(1, tau/S_h):
- multi-head attention: W_q^h and W_k^h (and their biases) x sqrt(gamma_h), so the head's logits scale by gamma_h;
- grouped-query attention (a key head shared by a group g): W_k^g x sqrt(gamma_g) with gamma_g the group's smallest
  gamma, and W_q^h x gamma_h / sqrt(gamma_g), so every head's logits still scale by exactly its own gamma_h;
- MLA (Kimi's case): the head-specific parts only. The no-position query and key parts (q_C, k_C) x sqrt(gamma_h),
  the rotary query part (q_R) x gamma_h, and the rotary key every head shares (k_R, in wkv_a) is left alone.
The per-head maxima are max-reduced over every rank (one all-reduce of [layers, heads] floats per step: data
parallel ranks saw other samples, tensor parallel ranks other heads, pipeline stages other layers).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from framework.config import ModelConfig
from framework.models.attention import Attention

_LAYER = re.compile(r"^(layers|mtp)\.(\d+)\.")


def _row_of(name: str, cfg: ModelConfig) -> int | None:
    """The row of an attention module in the [layers (+ MTP depths), heads] table; None for cross-attention."""
    match = _LAYER.match(name)
    if match is None or "cross" in name:
        return None
    index = int(match.group(2))
    return index if match.group(1) == "layers" else cfg.n_layers + index


class QKClip:
    """Tracks the max logit of every self-attention head of `model` and rescales W_q/W_k after each step.

    `reduce_max` max-reduces a tensor over every rank in place (identity on one process)."""

    def __init__(
        self, model: nn.Module, cfg: ModelConfig, tau: float, reduce_max: Callable[[torch.Tensor], None]
    ) -> None:
        self.cfg, self.tau, self.reduce_max = cfg, tau, reduce_max
        self.modules: dict[int, Attention] = {}
        for name, module in model.named_modules():
            row = _row_of(name, cfg) if isinstance(module, Attention) else None
            if row is not None:
                self.modules[row] = module
                module.track_logits = True
        self.rows = cfg.n_layers + (cfg.mtp.depth if cfg.mtp is not None else 0)

    @classmethod
    def for_recipe(
        cls, model: nn.Module, cfg: ModelConfig, tau: float, reduce_max: Callable[[torch.Tensor], None]
    ) -> QKClip | None:
        """The clip of optim.qk_clip = tau, or None when it is 0 (off)."""
        return cls(model, cfg, tau, reduce_max) if tau > 0 else None

    def start_step(self) -> None:
        """Forget the last step's maxima (evaluation forwards in between record too)."""
        for module in self.modules.values():
            module.max_logit = None

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Rescale the heads over tau; returns the step's largest logit and how many heads were clipped."""
        device = next(m.parameters()).device if (m := next(iter(self.modules.values()), None)) else None
        table = torch.full((self.rows, self.cfg.n_heads), float("-inf"), device=device)
        for row, module in self.modules.items():
            if module.max_logit is not None:
                local = module.max_logit
                table[row, module.head_offset : module.head_offset + local.numel()] = local
        self.reduce_max(table)
        gamma = (self.tau / table).clamp(max=1.0)
        for row, module in self.modules.items():
            if bool((gamma[row] < 1).any()):
                rescale_heads(module, gamma[row], self.cfg)
        return {"qk_max_logit": table.max().item(), "qk_clipped_heads": int((table > self.tau).sum().item())}


def rescale_heads(module: Attention, gamma: torch.Tensor, cfg: ModelConfig) -> None:
    """Scale module's query/key weights so head h's logits scale by gamma[h] (global heads)."""
    heads = cfg.n_heads
    mla = getattr(module, "mla", None)
    if mla is not None:
        nope, rope, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        root = gamma.sqrt()
        query = torch.cat([root[:, None].expand(heads, nope), gamma[:, None].expand(heads, rope)], dim=1)
        key = torch.cat([root[:, None].expand(heads, nope), torch.ones(heads, v, device=gamma.device)], dim=1)
        wq = getattr(module, "wq", None) or module.wq_b
        _scale_rows(wq, query.flatten())
        _scale_rows(module.wkv_b, key.flatten())
        return
    kv_heads, head_dim = cfg.resolved_kv_heads, module.head_dim
    group = gamma.view(kv_heads, heads // kv_heads).amin(dim=1)  # the group's smallest gamma
    q_factor = gamma / group.repeat_interleave(heads // kv_heads).sqrt()
    k_factor = group.sqrt()
    for linear, factor in ((module.wq, q_factor), (module.wk, k_factor)):
        rows = factor.repeat_interleave(head_dim)
        _scale_rows(linear.weight, rows)
        if linear.bias is not None:
            _scale_rows(linear.bias, rows)


def _scale_rows(target: nn.Linear | torch.Tensor, factor: torch.Tensor) -> None:
    """target (a weight or bias, or a Linear's weight) *= factor per row, in its own placement: a DTensor takes
    a replicated factor, which DTensor slices to the rows this rank holds."""
    param = target.weight if isinstance(target, nn.Linear) else target
    f = factor.to(param.dtype).view((-1,) + (1,) * (param.ndim - 1))
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        f = DTensor.from_local(
            f.to(param.to_local().device), mesh, [Replicate()] * mesh.ndim, run_check=False
        )
    param.mul_(f)
