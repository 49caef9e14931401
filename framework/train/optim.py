"""AdamW with weight-decay parameter groups.

Decoupled weight decay pulls weights towards zero; that is meant for weight matrices only. Norm gains, biases and
any other 1-D parameter are never decayed (decaying a norm gain towards 0 shrinks the whole residual branch), and
embedding tables are decayed only when `optim.decay_embeddings` is set.

Each of those groups is split once more by parameter layout: plain tensors, and DTensors per device mesh. The
fused (and foreach) AdamW kernels take one list per launch and refuse a list that mixes plain tensors and
DTensors ("_fused_adamw_ got mixed torch.Tensor and DTensor"), which is what tensor parallelism without FSDP
gives: norms and embeddings stay plain, projections are DTensors on the tp mesh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from framework.config import OptimConfig

_EMBEDDING_NAME_PARTS = ("embeddings", "embedding")


def _embedding_param_names(model: nn.Module) -> set[str]:
    """Parameters that are embedding tables: owned by an nn.Embedding, or with a `*_embeddings` part in their name."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            by_name = any(part.endswith(_EMBEDDING_NAME_PARTS) for part in full.split("."))
            if isinstance(module, nn.Embedding) or by_name:
                names.add(full)
    return names


def split_decay_groups(model: nn.Module, decay_embeddings: bool) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names. Shared (tied) parameters appear once, under their first name."""
    embeddings = _embedding_param_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2
        decayed = is_matrix and (decay_embeddings or name not in embeddings)
        (decay if decayed else no_decay).append(name)
    return decay, no_decay


def use_fused(cfg: OptimConfig, device: torch.device) -> bool:
    """optim.fused, or when null: the fused kernel on CUDA (one launch for all tensors), the default path elsewhere."""
    return cfg.fused if cfg.fused is not None else device.type == "cuda"


def layout_of(param: torch.Tensor) -> object:
    """What a fused kernel needs the same within one list: None for a plain tensor, else the DTensor's mesh."""
    return param.device_mesh if isinstance(param, DTensor) else None


def split_by_layout(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`params` in one list per layout, each in the original order, layouts in order of first appearance."""
    layouts: dict[object, list[torch.Tensor]] = {}
    for p in params:
        layouts.setdefault(layout_of(p), []).append(p)
    return list(layouts.values())


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Decayed matrices (weight_decay) then everything else (0), each split by layout; empty groups dropped."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay_groups(model, cfg.decay_embeddings)
    groups = []
    for names, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        for layout in split_by_layout([params[n] for n in names]):
            groups.append({"params": layout, "weight_decay": weight_decay})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over param_groups(model, cfg)."""
    groups = param_groups(model, cfg)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=use_fused(cfg, device)
    )
