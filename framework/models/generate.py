"""Greedy decoding without a KV cache: each step reruns the whole sequence (fine for tests and small models)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, steps: int, *, decoder_start_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, steps], top-1 minus top-2 logit at each step [B, steps]).

    Decoder models extend `input_ids`; encoder-decoder models (pass decoder_start_id) encode `input_ids` and grow
    the decoder input from the start token. The margins show how safely the argmax is defined."""
    encoder_decoder = decoder_start_id is not None
    start = torch.full(
        (input_ids.shape[0], 1), decoder_start_id or 0, dtype=torch.long, device=input_ids.device
    )
    seq = start if encoder_decoder else input_ids
    tokens, margins = [], []
    for _ in range(steps):
        logits = model(input_ids, decoder_input_ids=seq) if encoder_decoder else model(seq)
        top = logits[:, -1].float().topk(2, dim=-1)
        tokens.append(top.indices[:, 0])
        margins.append(top.values[:, 0] - top.values[:, 1])
        seq = torch.cat([seq, top.indices[:, :1]], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(margins, dim=1)
