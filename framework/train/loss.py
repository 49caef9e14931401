"""Token cross-entropy normalised over the whole global batch, and the PaLM output z-loss.

With gradient accumulation, each micro-batch's summed loss is divided by the labelled-token count of the *whole*
global batch (counted before any backward), so the accumulated gradient equals that of one big batch even when
micro-batches hold different numbers of labelled tokens (a per-micro-batch mean would weight them equally).

z-loss (PaLM, Chowdhery et al. 2022): z * mean over labelled tokens of logsumexp(logits)^2. It pushes the softmax
normaliser log Z towards 0, keeping logits bounded; it is normalised like the cross-entropy.

Tensor parallelism hands in logits as a DTensor sharded over the vocabulary (framework/parallel/tensor.py). They are
never gathered: the cross-entropy is torch's loss_parallel one (the caller runs forward and backward inside
`torch.distributed.tensor.parallel.loss_parallel()`), log Z for the z-loss is built from DTensor reductions that
exchange one number per token, and the sums come back as plain tensors equal on every tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """`loss` is what backward runs on; `ce` and `z_loss` are its two detached parts, for logging."""

    loss: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor
    mtp: torch.Tensor | None = None
    """Multi-token prediction: [D] detached per-depth losses (framework/train/mtp_loss.py); None without it."""


def count_labelled(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled (not -100) tokens, as a device tensor (no host sync)."""
    return (labels != IGNORE_INDEX).sum()


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, with_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy, sum of logsumexp^2) over labelled tokens, in fp32.

    Logits are upcast first: logsumexp over a large vocabulary in bf16/fp16 loses the precision the loss needs.
    """
    logits = logits.float().flatten(0, -2)
    labels = labels.flatten()
    if isinstance(logits, DTensor):
        return _vocab_parallel_sums(logits, labels, with_z)
    if not with_z:
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return ce, logits.new_zeros(())
    mask = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # cross-entropy = log Z - logit[label]; the same log Z feeds the z-loss.
    ce = torch.where(mask, lse - target, 0.0).sum()
    z = torch.where(mask, lse.square(), 0.0).sum()
    return ce, z


def _vocab_parallel_sums(
    logits: DTensor, labels: torch.Tensor, with_z: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_sums for [N, V] logits sharded over V. loss_parallel's cross-entropy supports ignore_index and sum
    reduction. torch.logsumexp on a DTensor all-gathers the whole [N, V] input (measured, torch 2.13), so
    log Z = m + log sum exp(x - m) is written with amax and sum: two all-reduces of [N] values."""
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").full_tensor()
    if not with_z:
        return ce, ce.new_zeros(())
    peak = logits.detach().amax(dim=-1, keepdim=True)  # a constant shift: log Z does not depend on it
    peak = peak.redistribute(placements=[Replicate()] * peak.device_mesh.ndim)  # max over the vocab shards
    lse = (peak + (logits - peak).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1).full_tensor()
    z = torch.where(labels != IGNORE_INDEX, lse.square(), 0.0).sum()
    return ce, z


def compute_loss(
    logits: torch.Tensor, labels: torch.Tensor, total_labelled: torch.Tensor, z_coef: float
) -> LossOutput:
    """Loss of one micro-batch as its share of the global-batch mean: sums / total labelled tokens (>= 1)."""
    ce_sum, z_sum = loss_sums(logits, labels, with_z=z_coef > 0)
    denom = total_labelled.clamp(min=1).to(ce_sum.dtype)
    ce = ce_sum / denom
    z = z_coef * z_sum / denom
    return LossOutput(loss=ce + z, ce=ce.detach(), z_loss=z.detach())
