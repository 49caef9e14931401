"""train.deterministic: torch's deterministic algorithms for one run, and what they cannot cover.

On: torch.use_deterministic_algorithms(True) (ops with a deterministic kernel use it: scatter/index_add with
accumulation, cuDNN convolutions, SDPA's memory-efficient backward; an op without one warns each time it runs),
cuDNN autotuning off, cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8, which cuBLAS reads at its first
call, hence set before the model is built), and Transformer Engine's deterministic fused-attention backward
(NVTE_ALLOW_NONDETERMINISTIC_ALGO=0). Loom's own reductions already run in a fixed order: loss and token sums per
rank then one all-reduce, gradient norms per layout; the MoE combine is an index_add_, which deterministic mode
covers (or warns about, where a torch version has no deterministic kernel for it). The flags are process-wide;
`deterministic_run` restores the previous ones when the run ends (in-process callers such as tests keep theirs).
Costs and limits: docs/stability.md ("Determinism").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
"""Environment the deterministic kernels need (set only where the user has not set them)."""


@contextmanager
def deterministic_run(enabled: bool) -> Iterator[None]:
    """Deterministic algorithms for the body when `enabled`; torch's previous settings afterwards."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    added = {k: v for k, v in ENV.items() if k not in os.environ}
    os.environ.update(added)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        for key in added:
            os.environ.pop(key, None)
