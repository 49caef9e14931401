"""Split a nested state into flat tensors (for torch.distributed.checkpoint) and a JSON skeleton, and back.

Tensors travel through DCP under flat keys joined by '/', which never occurs in parameter names, so the split is
reversible without guessing. Everything else (counters, scheduler and scaler state, optimizer hyperparameters) is
plain data written as JSON: no pickle anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SEP = "/"


def split_tensors(
    tree: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(flat {path: tensor}, the same tree without its tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or SEP in key:
            raise ValueError(f"state key {prefix}{key!r} must be a string without {SEP!r}")
        path = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[path] = value
        elif isinstance(value, Mapping):
            sub_tensors, plain[key] = split_tensors(value, path + SEP)
            tensors.update(sub_tensors)
        else:
            _check_no_tensors(value, path)
            plain[key] = value
    return tensors, plain


def _check_no_tensors(value: Any, path: str) -> None:
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            raise ValueError(f"state at {path!r} holds a tensor inside a list; use a dict keyed by name")
        _check_no_tensors(item, path)


def merge_tensors(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of split_tensors: put each tensor back at its path inside a copy of the skeleton."""
    tree = _copy_dicts(plain)
    for path, tensor in tensors.items():
        *parents, leaf = path.split(SEP)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = tensor
    return tree


def _copy_dicts(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
