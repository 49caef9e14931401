"""Optional seam for the `mamba_ssm` kernel library (Dao & Gu's Triton SSD kernels) — the only Loom file that
imports it. Every import happens inside a function, so a machine without mamba_ssm (every CPU machine) imports
all of Loom, and `available()` says whether it is usable here.

What is used: `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None,
z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False, ...)` with x [B, S, H, P], dt [B, S, H],
A [H], B/C [B, S, G, N] — Loom's layout — and seq_idx [B, S] int32, the document index of each token (the kernel
resets the state where it changes). Loom passes dt after softplus (dt_softplus False, no dt_bias) and applies D and
the gated norm itself, so the kernel replaces exactly `chunked_ssd`'s y. `MambaSSMKernel` is installed on
`Mamba2.kernel` (framework/models/mamba2.py), which calls it only for CUDA tensors.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

INSTALL_HINT = "on a CUDA machine: pip install mamba-ssm (it builds against the installed CUDA torch)"


def import_ssd() -> ModuleType:
    """mamba_ssm.ops.triton.ssd_combined, or ImportError with the install hint."""
    try:
        return importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except (ImportError, OSError, RuntimeError) as err:  # OSError: CUDA shared objects missing
        raise ImportError(f"mamba_ssm is not importable ({err}); install it {INSTALL_HINT}") from err


def available() -> bool:
    """Whether mamba_ssm's SSD kernels import here and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import_ssd()
    except ImportError:
        return False
    return True


class MambaSSMKernel:
    """Mamba2.kernel backed by mamba_chunk_scan_combined. A plain object: parameters and names do not change."""

    def chunk_scan(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        Bm: torch.Tensor,
        Cm: torch.Tensor,
        starts: torch.Tensor | None,
        chunk_size: int,
    ) -> torch.Tensor:
        """y [B, S, H, P] without the D skip, as framework.models.mamba2.chunked_ssd returns it."""
        seq_idx = None if starts is None else torch.cumsum(starts.to(torch.int32), dim=1, dtype=torch.int32)
        ssd = import_ssd()
        y = ssd.mamba_chunk_scan_combined(
            x, dt, A.float(), Bm, Cm, chunk_size, seq_idx=seq_idx, dt_softplus=False
        )
        return y


def install_mamba_ssm(model: nn.Module) -> int:
    """Set `kernel` on every Mamba2 mixer of `model`; returns how many. ImportError when mamba_ssm is absent."""
    from framework.models.mamba2 import Mamba2

    import_ssd()
    kernel, count = MambaSSMKernel(), 0
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.kernel, count = kernel, count + 1
    return count
