"""What the recurrent mixers (Gated DeltaNet, Mamba-2) share: document starts, the causal depthwise convolution
with document resets, and the base class whose hooks parallel code replaces (framework/parallel/recurrent.py),
so the mixers stay single-device PyTorch.

Hooks of a `RecurrentMixer` (plain attributes; the defaults run on one device):
* `starts_hook(ctx)` -> the document starts the conv and scan take (None without documents);
* `conv_hook(conv, x, halo, starts)` -> conv(x, starts), the causal depthwise conv; `halo` = kernel - 1 is how many
  earlier tokens it reads (context parallelism prepends them from the previous rank);
* `scan_hook(scan, *inputs, starts)` -> the scan's output from a zero state (context parallelism runs it from the
  state the earlier ranks hand over);
* `local_view(p)`: this rank's shard of a per-channel/per-head parameter (tensor parallelism);
* `shared_view(p)`: a parameter every head uses, whose gradient tensor parallelism sums over its ranks.
Subclasses name their layout for tensor parallelism (`tp_columns`, `tp_per_channel`, `tp_row`) and give the
affine map of their state over a span (`transition`, `apply_transition`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from framework.models.attention import AttentionContext


def document_starts(documents: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] document ids -> [B, S] bool, True where a document starts (position 0 and wherever the id changes)."""
    if documents is None:
        return None
    change = documents[:, 1:] != documents[:, :-1]
    return torch.cat([torch.ones_like(documents[:, :1], dtype=torch.bool), change], 1)


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_t = bias + sum_{s<K} weight[:, K-1-s] * x_{t-s} over x [B, S, C], weight [C, K] (nn.Conv1d(groups=C,
    padding=K-1)[..., :S]). Taps reaching before the token's document (starts [B, S] bool) or before position 0
    contribute zero, as varlen kernels do; `initial` [B, K-1, C] are the K-1 tokens before position 0, belonging
    to the document of the rows' first token unless that token starts one."""
    b, s, c = x.shape
    taps = weight.shape[1]
    if starts is None and initial is None:  # one fused op
        out = torch.nn.functional.conv1d(
            x.transpose(1, 2), weight[:, None, :], bias, padding=taps - 1, groups=c
        )
        return out[..., :s].transpose(1, 2)
    prev = x.new_zeros(b, taps - 1, c) if initial is None else initial.to(x.dtype)
    xp = torch.cat([prev, x], 1)  # xp[:, t + K-1] = x_t
    seg = None
    if starts is not None:
        seg = starts.long().cumsum(1)
        seg = torch.cat([seg.new_zeros(b, taps - 1), seg], 1)  # the previous tokens are document 0
    y = 0
    for shift in range(taps):
        tap = xp[:, taps - 1 - shift : taps - 1 - shift + s]  # x_{t - shift}
        if seg is not None:
            same = seg[:, taps - 1 - shift : taps - 1 - shift + s] == seg[:, taps - 1 :]
            tap = tap * same[..., None].to(x.dtype)
        y = y + tap * weight[:, taps - 1 - shift].to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def default_starts_hook(ctx: AttentionContext) -> torch.Tensor | None:
    return document_starts(ctx.mask.q_documents)


def default_conv_hook(
    conv: Callable[..., torch.Tensor], x: torch.Tensor, halo: int, starts: object
) -> torch.Tensor:
    """Single device: no earlier tokens."""
    return conv(x, starts)


def default_scan_hook(
    scan: Callable[..., tuple[torch.Tensor, torch.Tensor]], *inputs: torch.Tensor, starts: object
):
    """Single device: the whole sequence in one call from a zero state; the output only."""
    return scan(*inputs, starts=starts)[0]


class RecurrentMixer(nn.Module):
    """Base of the recurrent mixers: installs the default hooks (module docstring)."""

    tp_columns: tuple[str, ...] = ()
    """Input projections tensor parallelism splits by output rows (heads)."""
    tp_per_channel: tuple[str, ...] = ()
    """Per-channel / per-head parameters sharded along dim 0 with their heads (read through local_view)."""
    tp_row: str = ""
    """The output projection (row-parallel)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts_hook: Callable[[AttentionContext], object] = default_starts_hook
        self.conv_hook = default_conv_hook
        self.scan_hook = default_scan_hook
        self.local_view: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.shared_view: Callable[[torch.Tensor], torch.Tensor] = _identity

    def transition(self, *inputs: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
        """The linear part T of the state map over this span: final(S0) = apply_transition(T, S0) + final(0)."""
        raise NotImplementedError

    @staticmethod
    def apply_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
