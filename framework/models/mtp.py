"""Multi-token prediction (DeepSeek-V3 section 2.2, `model.mtp`): D extra depths after the main stack.

Depth k (1..D) at position i combines the embedding of token i+k with the previous depth's hidden state,

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      eh_proj: Linear(2d -> d), no bias
    h^k_i  = norm(block(h'^k_i))                                     block: one TransformerBlock

and the shared output head turns h^k_i into the logits of token i+k+1. h^0 is the main stack's output after its
final norm (transformers' MtpModel takes hidden_states[-1]); the normed h^k feeds both the head and depth k+1
(transformers' MtpLayer post_norm, HF checkpoints' shared_head.norm). The block is built with the index it would
have after the main stack (n_layers + k - 1), so its mixer (model.layers.pattern) and whether its feed-forward is
MoE (model.moe.first_dense / every) follow the layer rules. Embedding, head, masks and RoPE are the main model's:
every depth attends over the same positions as the main stack. Emb is the plain token lookup (no position or type
tables, embedding scale or embed_norm), as DeepSeek-V3's and transformers' MtpModel's (which strips embed_norm).

Positions i + k past the end of the sequence embed whatever id the roll brings there; their labels (shifted left
by k, framework/train/mtp_loss.py) are ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.config.schema import ModelConfig
from framework.models.attention import AttentionContext
from framework.models.norms import build_norm


class MTPLayer(nn.Module):
    """One prediction depth: enorm, hnorm, eh_proj, block, norm (module docstring)."""

    def __init__(self, cfg: ModelConfig, depth: int, block: nn.Module) -> None:
        """depth: k, 1-based; block: the TransformerBlock built with index n_layers + k - 1."""
        super().__init__()
        self.depth = depth
        self.enorm = build_norm(cfg)
        self.hnorm = build_norm(cfg)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = block
        self.norm = build_norm(cfg)

    def forward(self, embedded: torch.Tensor, previous: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """embedded: Emb(t_{i+k}) [B, S, D]; previous: h^{k-1} [B, S, D] -> h^k (normed) [B, S, D]."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(previous)], dim=-1))
        # called with every positional input a main-stack block takes (sequence-parallel plans count them)
        return self.norm(self.block(x, ctx, None, None))


def mtp_block_index(cfg: ModelConfig, depth: int) -> int:
    """The layer index the block of depth k (1-based) is built with: right after the main stack."""
    return cfg.n_layers + depth - 1


def shifted_ids(input_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, S] ids moved left by `depth` (position i holds token i + depth); the last `depth` positions wrap
    around and are never scored (their labels are IGNORE_INDEX)."""
    return torch.roll(input_ids, shifts=-depth, dims=1)
