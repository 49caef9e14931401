"""`loom ckpt consolidate`: the full model of a checkpoint of any parallel layout as safetensors, on the CPU, in
one process without a process group.

DCP stores each tensor as the chunks its ranks held plus their offsets in the global tensor; asking it to load into
a tensor of the global shape gathers every chunk into place, whatever layout wrote them. Only the model's keys are
allocated and read (the optimizer's moments, twice the model's size in fp32, stay on disk).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.verify import (
    load_tensors,
    read_dcp_metadata,
    read_meta_json,
    verify_checkpoint,
)
from framework.config.errors import ConfigError
from framework.kernels.fp8 import COMPUTE_DTYPES

MODEL_PREFIX = "model/"
INDEX = "consolidated.json"
RECIPE = "recipe.yaml"
DTYPES = ("bf16", "fp32", "fp16")  # --dtype choices (framework/kernels/fp8.py maps names to dtypes)


@dataclass
class ModelState:
    path: Path
    """The resolved step directory."""
    meta: dict[str, Any]
    """meta.json as saved (step, tokens, recipe, layout...)."""
    tensors: dict[str, torch.Tensor]
    """The model's state dict: parameter names without the 'model/' prefix, full (unsharded) tensors."""


def read_model_state(path: str | Path, dtype: torch.dtype | None = None) -> ModelState:
    """Verify the checkpoint at `path` (a step directory, or a root via `latest`) and read its full model."""
    from framework.checkpoint.io import resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    verify_checkpoint(step_dir, hashes=True)  # a changed byte anywhere refuses, before any tensor is read
    meta = read_meta_json(step_dir / "meta.json")
    if (step_dir / "deepspeed").is_dir():  # a DeepSpeed run: the model is in DeepSpeed's ZeRO files
        from framework.deepspeed.checkpoint import read_deepspeed_model

        return ModelState(
            step_dir, meta, {k: _cast(t, dtype) for k, t in read_deepspeed_model(step_dir).items()}
        )
    targets = _model_targets(step_dir)
    if not targets:
        raise ConfigError(
            None, "checkpoint", str(step_dir), "holds no model tensors (no 'model/' keys)",
            "pass a checkpoint written by loom train",
        )  # fmt: skip
    load_tensors(targets, step_dir, no_dist=True)
    tensors = {key.removeprefix(MODEL_PREFIX): _cast(t, dtype) for key, t in targets.items()}
    return ModelState(step_dir, meta, tensors)


def _model_targets(step_dir: Path) -> dict[str, torch.Tensor]:
    """An empty full-size tensor per model key, in the dtype it was saved in."""
    return {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in read_dcp_metadata(step_dir).state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # integer buffers (position ids, counters) keep their dtype; only floating weights change precision
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def consolidate(
    path: str | Path,
    out: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Write OUT/model.safetensors (or size-limited shards + HF's index), OUT/consolidated.json and
    OUT/recipe.yaml; returns OUT. `max_shard_bytes` 0 means the default (5 GiB per file). OUT appears whole or
    not at all (a staged sibling renamed into place); an existing non-empty OUT is refused unless `overwrite`,
    which replaces it whole; OUT may never be, hold or lie inside the checkpoint."""
    from framework.convert.hf.weights import DEFAULT_SHARD_BYTES, save_weights
    from framework.convert.output import staged

    torch_dtype = _parse_dtype(dtype)
    out = _check_output(out, path, overwrite)  # before the (long) read
    state = read_model_state(path, torch_dtype)  # a damaged shard: one line (verify.load_tensors)
    with staged(out, "consolidate", overwrite=overwrite) as tmp:
        files = save_weights(state.tensors, tmp, max_shard_bytes or DEFAULT_SHARD_BYTES)
        _write_index(tmp, state, files)
        if isinstance(state.meta.get("recipe"), dict):
            (tmp / RECIPE).write_text(yaml.safe_dump(state.meta["recipe"], sort_keys=False))
    return out


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None or dtype in DTYPES:
        return COMPUTE_DTYPES[dtype] if dtype else None
    raise ConfigError(
        "command line", "--dtype", dtype, "is not a known dtype", f"use one of: {', '.join(DTYPES)}"
    )


def _check_output(out: str | Path, source: str | Path, overwrite: bool) -> Path:
    # a consolidation into a folder holding another model's shards would leave a mix that loads as neither
    from framework.convert.output import check

    return check(out, [source], overwrite)


def _write_index(out: Path, state: ModelState, files: list[str]) -> None:
    """Where each tensor went, with its shape and dtype, and the checkpoint it came from."""
    weight_map = _weight_map(out, files)
    index = {
        "source": str(state.path),
        "step": state.meta.get("step"),
        "tokens": state.meta.get("tokens"),
        "layout": state.meta.get("layout", "unknown"),
        "tensors": {
            name: {
                "file": weight_map[name],
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
            }
            for name, t in state.tensors.items()
        },
    }
    with open(out / INDEX, "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _weight_map(out: Path, files: list[str]) -> dict[str, str]:
    from safetensors import safe_open

    weight_map = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(out / name), framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
    return weight_map
