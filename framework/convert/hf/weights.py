"""Safetensors files as Hugging Face lays them out: one `model.safetensors`, or shards plus an index above a size
threshold. Tensors only, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from framework.config.errors import ConfigError
from framework.outputs import read_json_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' own default max_shard_size


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most max_bytes each (a single larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(
    state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[str]:
    """Write `state` into `out`; returns the file names written."""
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE, metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint; a malformed index or a truncated or
    damaged file is one ConfigError naming the file."""
    if (directory / INDEX).is_file():
        files = _indexed_files(directory / INDEX)
    elif (directory / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ConfigError(
            None, "source", str(directory), f"has no {SINGLE} or {INDEX}",
            "pass a Hugging Face model folder saved with safetensors (save_pretrained)",
        )  # fmt: skip
    state = {}
    for name in files:
        state.update(_read_file(directory / name))
    return state


def _indexed_files(index: Path) -> list[str]:
    weight_map = read_json_file(index, "the safetensors index", key="source")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        rule = "has no weight_map object of tensor name -> file name"
        raise ConfigError(None, "source", str(index), rule, "restore the file, or save the model again")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or not (index.parent / name).is_file():
            rule = f"names the weights file {name!r}, which is not in this folder"
            raise ConfigError(None, "source", str(index), rule, "copy the model folder again")
    return files


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except SafetensorError as error:  # a truncated or damaged file: the header and the data disagree
        rule = f"is not a readable safetensors file ({error})"
        raise ConfigError(None, "source", str(path), rule, "copy the model folder again") from None


def parse_size(text: str) -> int:
    """'5GB', '200MB', '10KB' or a byte count -> bytes (powers of 1000, as transformers' max_shard_size)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * scale)
    if upper.isdigit() and int(upper) > 0:
        return int(upper)
    raise ConfigError(
        "command line", "--max-shard-size", text, "is not a size", "write e.g. 5GB, 200MB or 1000000"
    )
