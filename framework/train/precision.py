"""Compute precision: autocast per dtype and the fp16 dynamic loss scaler.

Master weights, gradients and optimizer state stay fp32 in every mode; only the forward/backward math runs in
bf16/fp16 under autocast. fp16's narrow exponent range needs loss scaling: the loss is multiplied by S before
backward so small gradients do not flush to zero, gradients are divided by S before clipping and the update, and S
adapts: x backoff_factor on an overflow (that step is skipped), x growth_factor after growth_interval clean steps.

With several processes the overflow check must be one decision: ranks whose found-inf flags differ back off
differently and train with different scales from then on. A rank checks only the gradients it holds: torch's
DTensor dispatch max-reduces the flag over a sharded gradient's own mesh (FSDP2), but plain replicated gradients
(DDP's, TP's norms and embeddings) are checked on each rank alone, so a fault in one replica would go unseen by
the others. Given a process group, the scaler is torch's `ShardedGradScaler`, whose unscale_ sums the flag over
the group (one scalar all-reduce), so every rank skips and rescales alike.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch.distributed import ProcessGroup
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from framework.config import PrecisionConfig
from framework.kernels.fp8 import COMPUTE_DTYPES, fp8_context


class Precision:
    """Autocast context and (fp16 only) the GradScaler, built from the recipe's `precision` section."""

    def __init__(
        self, cfg: PrecisionConfig, device: torch.device, process_group: ProcessGroup | None = None
    ) -> None:
        """process_group: the ranks that must agree on every overflow (the whole world); None for one process."""
        self.name = cfg.resolved_dtype(device.type)
        self.device = device
        compute = COMPUTE_DTYPES[self.name]  # fp8: its float8 Linears sit inside bf16 autocast
        self.autocast_dtype: torch.dtype | None = None if compute is torch.float32 else compute
        self.scaler: torch.amp.GradScaler | None = None
        self._fp8 = functools.partial(fp8_context, cfg, process_group)  # TE's fp8 autocast; else a no-op
        if self.name == "fp16":
            options = dict(
                init_scale=cfg.loss_scale_init,
                growth_factor=cfg.loss_scale_growth_factor,
                backoff_factor=cfg.loss_scale_backoff_factor,
                growth_interval=cfg.loss_scale_growth_interval,
            )
            if process_group is None:
                self.scaler = torch.amp.GradScaler(device.type, **options)
            else:
                self.scaler = LayoutGradScaler(device.type, process_group=process_group, **options)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward-pass context: nothing for fp32, torch.autocast in the compute dtype otherwise."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype), self._fp8():
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (multiplied by the current loss scale in fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class LayoutGradScaler(ShardedGradScaler):
    """torch's ShardedGradScaler (found-inf summed over the process group), unscaling one gradient layout at a
    time: the foreach unscale kernel refuses a list that mixes plain tensors and DTensors (tensor parallelism
    keeps norms and embeddings plain, projections as DTensors on the tp mesh), so each layout — plain, or DTensor
    per mesh — is handed to torch's own `_unscale_grads_` by itself and the found-inf flags are added up."""

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool = True,
    ) -> dict[torch.device, torch.Tensor]:
        layouts: dict[object, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                    layouts.setdefault(key, []).append(p)
        found: dict[torch.device, torch.Tensor] = {}
        # Same parameter order on every rank, so the DTensor layouts' found-inf reductions pair up across ranks.
        for params in layouts.values() or [[]]:
            one_layout = SimpleNamespace(param_groups=[{"params": params}])
            for device, flag in super()._unscale_grads_(one_layout, inv_scale, found_inf, allow_fp16).items():
                found[device] = found[device] + flag if device in found else flag
        return found
