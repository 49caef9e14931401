"""Which keys each query may attend to, written once as a predicate over (batch, query, key) indices.

The same predicate builds the dense boolean mask (naive / SDPA backends, by broadcasting index tensors) and
the FlexAttention `mask_mod` (called with scalar indices), so the backends cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    """Rules combined with AND: causal (key <= query, or key inside the sequence's prefix for prefix-LM),
    sliding window (query - key < window), documents (same document id). No rule = full attention."""

    causal: bool = False
    window: int | None = None
    prefix_lengths: torch.Tensor | None = None
    """[B] prefix-LM: keys before prefix_lengths[b] are visible to every query (only with causal)."""
    q_documents: torch.Tensor | None = None
    """[B, Sq] document id of each query."""
    k_documents: torch.Tensor | None = None
    """[B, Sk] document id of each key (the same tensor as q_documents for self-attention)."""

    @property
    def is_full(self) -> bool:
        return not self.causal and self.window is None and self.q_documents is None

    @property
    def is_plain_causal(self) -> bool:
        """Causal with nothing else: SDPA can use is_causal=True (flash / efficient kernels)."""
        return (
            self.causal and self.window is None and self.prefix_lengths is None and self.q_documents is None
        )

    def allowed(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """True where query q of sequence b may see key k; indices broadcast against each other. Each rule
        compares index vectors (`k > q - window`, not `q - k < window`), so the dense mask's only [Sq, Sk]
        tensors are booleans: no int64 S x S difference is ever built."""
        rules: list[torch.Tensor] = []
        if self.causal:
            seen = k <= q
            rules.append(seen if self.prefix_lengths is None else seen | (k < self.prefix_lengths[b]))
        if self.window is not None:
            rules.append(k > q - self.window)
        if self.q_documents is not None and self.k_documents is not None:
            rules.append(self.q_documents[b, q] == self.k_documents[b, k])
        if not rules:
            return torch.ones(
                torch.broadcast_shapes(b.shape, q.shape, k.shape), dtype=torch.bool, device=q.device
            )
        return functools.reduce(torch.logical_and, rules)

    def dense(self, batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Boolean mask [B, 1, Sq, Sk] (True = attend) for SDPA / the naive backend."""
        b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        q = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
        k = torch.arange(k_len, device=device).view(1, 1, 1, k_len)
        return self.allowed(b, q, k).expand(batch, 1, q_len, k_len)

    def mask_mod(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """A FlexAttention mask_mod (b, h, q, k) -> bool; every head shares the mask."""

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return self.allowed(b, q, k)

        return mask_mod
