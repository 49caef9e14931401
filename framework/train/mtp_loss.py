"""The multi-token prediction loss (DeepSeek-V3 eq. 24-25): loss = main + loss_weight x mean_k CE_k.

The model stashes the logits of each depth k = 1..D in `mtp_logits` during a training forward
(framework/models/mtp.py); `mtp_loss` reads and releases them. Depth k at position i predicts token i + k + 1, so
its labels are the main labels shifted left by k (IGNORE_INDEX where they run past the end). Each CE_k is
normalised like the main loss (framework/train/loss.py): its sum over the micro-batch divided by the labelled
tokens of the whole global batch (the main labels' count), so the accumulated step loss is a global-batch mean.

Logged on their own, before the weight: mtp_loss (mean over depths) and mtp_loss_1 .. mtp_loss_D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.train.loss import IGNORE_INDEX, loss_sums


@dataclass
class MTPLossOutput:
    """`loss`: loss_weight x mean_k CE_k (what backward adds to the main loss); `depths`: [D] detached CE_k."""

    loss: torch.Tensor
    depths: torch.Tensor


def mtp_labels(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, S] labels shifted left by `depth`, the last `depth` positions IGNORE_INDEX."""
    return F.pad(labels[:, depth:], (0, depth), value=IGNORE_INDEX)


def take_mtp_logits(model: nn.Module) -> list[torch.Tensor] | None:
    """The model's stashed MTP logits (None without them), released: they hold the forward's graph."""
    logits = getattr(model, "mtp_logits", None)
    if logits is not None:
        model.mtp_logits = None
    return logits


def mtp_loss(
    logits: list[torch.Tensor], labels: torch.Tensor, total_labelled: torch.Tensor, weight: float
) -> MTPLossOutput:
    """The weighted mean over depths of each depth's cross-entropy, normalised by `total_labelled` (>= 1)."""
    denom = total_labelled.clamp(min=1).float()
    ces = [loss_sums(lg, mtp_labels(labels, k), with_z=False)[0] / denom for k, lg in enumerate(logits, 1)]
    depths = torch.stack(ces)
    return MTPLossOutput(loss=weight * depths.mean(), depths=depths.detach())


def mtp_metrics(depths: list[float]) -> dict[str, float]:
    """The logged numbers from the step's per-depth losses (summed over micro-batches and ranks)."""
    out = {"mtp_loss": sum(depths) / len(depths)}
    out.update({f"mtp_loss_{k}": value for k, value in enumerate(depths, 1)})
    return out
