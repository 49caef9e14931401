"""The optimizer seam: parameter groups by rule, then AdamW or Muon (optim.name).

With optim.name muon the hidden weight matrices (see `muon_param_names`) go to Muon (framework/train/muon.py), the
rest to AdamW, in one optimizer whose groups carry `algorithm: muon | adamw`.

Decoupled weight decay pulls weights towards zero; that is meant for weight matrices only. Norm gains, biases and
any other 1-D parameter are never decayed (decaying a norm gain towards 0 shrinks the whole residual branch), and
embedding tables are decayed only when `optim.decay_embeddings` is set.

Each of those groups is split once more by parameter layout: plain tensors, and DTensors per device mesh. The
fused (and foreach) AdamW kernels take one list per launch and refuse a list that mixes plain tensors and
DTensors ("_fused_adamw_ got mixed torch.Tensor and DTensor"), which is what tensor parallelism without FSDP
gives: norms and embeddings stay plain, projections are DTensors on the tp mesh.
"""

from __future__ import annotations

import fnmatch
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


def _matrix_owner(module: nn.Module, param_name: str) -> bool:
    """A hidden weight matrix by default: a linear layer's weight, or an expert stack's (GroupedExperts w1/w2/w3)."""
    from framework.models.moe import GroupedExperts

    if isinstance(module, nn.Linear):
        return param_name == "weight"
    return isinstance(module, GroupedExperts) and param_name in ("w1", "w2", "w3")


OUTPUT_HEAD_NAMES = ("output.weight",)
"""The output head (an nn.Linear, yet Muon's authors leave it to AdamW, like the embeddings)."""


def muon_param_names(model: nn.Module, cfg: OptimConfig) -> set[str]:
    """Names Muon takes: the default rule (linear and expert weights, minus the embeddings and the output head),
    plus optim.muon.include, minus optim.muon.exclude (fnmatch globs); parameters of fewer than 2 dimensions never."""
    embeddings = _embedding_param_names(model)
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            default = _matrix_owner(module, param_name) and full not in embeddings
            default = default and full not in OUTPUT_HEAD_NAMES
            chosen = default or any(fnmatch.fnmatchcase(full, g) for g in cfg.muon.include)
            if chosen and not any(fnmatch.fnmatchcase(full, g) for g in cfg.muon.exclude) and param.ndim >= 2:
                names.add(full)
    return names


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


def group_names(model: nn.Module, cfg: OptimConfig) -> list[tuple[str, float, list[str]]]:
    """(algorithm, weight decay, parameter names) per group, before the split by layout: for optim.name muon the
    Muon matrices first (decayed), then AdamW's decayed and not-decayed parameters; for adamw only AdamW's."""
    decay, no_decay = split_decay_groups(model, cfg.decay_embeddings)
    muon = muon_param_names(model, cfg) if cfg.name == "muon" else set()
    groups = [
        ("muon", cfg.weight_decay, [n for n in decay + no_decay if n in muon]),
        ("adamw", cfg.weight_decay, [n for n in decay if n not in muon]),
        ("adamw", 0.0, [n for n in no_decay if n not in muon]),
    ]
    return [g for g in groups if g[2]]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """group_names' groups, each split by layout (empty groups dropped)."""
    params = dict(model.named_parameters())
    groups = []
    for algorithm, weight_decay, names in group_names(model, cfg):
        for layout in split_by_layout([params[n] for n in names]):
            groups.append({"params": layout, "weight_decay": weight_decay, "algorithm": algorithm})
    return groups


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    for group in groups:
        del group["algorithm"]  # torch's AdamW keeps unknown keys; a plain AdamW run saves none
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=use_fused(cfg, device)
    )


def _muon(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    from framework.train.muon import MuonAdamW

    return MuonAdamW(groups, cfg, device, fused=use_fused(cfg, device))


OPTIMIZERS = {"adamw": _adamw, "muon": _muon}
"""optim.name -> the builder of its optimizer over param_groups (one entry per optimizer)."""


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """optim.name's optimizer over param_groups(model, cfg)."""
    return OPTIMIZERS[cfg.name](param_groups(model, cfg), cfg, device)
