"""flash-linear-attention (FLA) adapter for Gated DeltaNet — the only Loom file that imports `fla`.

`fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
use_qk_l2norm_in_kernel, cu_seqlens)` is FLA's Triton kernel of the same chunked gated delta rule as
framework/models/gdn.py (q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]; with `cu_seqlens` the batch is one
row of packed sequences and states are per sequence, [N, H, K, V]). `fla_gated_delta_rule` has the signature of
gdn.chunked_gated_delta_rule, so it can be installed as `GatedDeltaNet.kernel`; GatedDeltaNet calls a kernel only
for CUDA tensors and otherwise runs the PyTorch chunked op. The import happens inside functions, so a machine
without FLA (every CPU machine) imports all of Loom; `available()` says whether FLA imports here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

INSTALL_HINT = "on a CUDA machine: pip install flash-linear-attention (Triton kernels)"


def _import_kernel() -> Callable:
    try:
        return importlib.import_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    except (ImportError, OSError, RuntimeError, AttributeError) as err:
        raise ImportError(f"flash-linear-attention is not importable ({err}); {INSTALL_HINT}") from err


def available() -> bool:
    """Whether fla.ops.gated_delta_rule imports here."""
    try:
        _import_kernel()
    except ImportError:
        return False
    return True


def packed_sequences(starts: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """cu_seqlens [N + 1] int64 of the rows flattened into one: every row start and every True in starts."""
    flat = torch.zeros(batch, seq, dtype=torch.bool, device=device) if starts is None else starts.clone()
    flat[:, 0] = True
    begins = flat.reshape(-1).nonzero().squeeze(-1)
    end = torch.tensor([batch * seq], device=device)
    return torch.cat([begins, end]).to(torch.int64)


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gdn.chunked_gated_delta_rule on FLA's kernel (CUDA, bf16/fp16 inputs): rows and documents become FLA's
    packed sequences; the initial state enters each row's first sequence unless the row starts a document there;
    the final state returned per row is that of the row's last sequence."""
    kernel = _import_kernel()
    b, s, h, _ = q.shape
    cu = packed_sequences(starts, b, s, q.device)
    first = cu[:-1] % s == 0  # sequences that begin a row
    row_of = cu[:-1] // s
    h0 = None
    if initial_state is not None:
        carry = first if starts is None else first & ~starts.reshape(-1)[cu[:-1]]
        h0 = torch.zeros(cu.numel() - 1, h, *initial_state.shape[2:], device=q.device, dtype=torch.float32)
        h0[carry] = initial_state.float()[row_of[carry]]
    flat = [x.reshape(1, b * s, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, final = kernel(
        *flat, scale=q.shape[-1] ** -0.5, initial_state=h0, output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu,
    )  # fmt: skip
    last = torch.cat([first[1:], first.new_ones(1)])  # a sequence is a row's last if the next begins a row
    return o.reshape(b, s, *o.shape[2:]).to(v.dtype), final[last].float()
