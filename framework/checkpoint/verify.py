"""Checks of a checkpoint directory that run before any tensor is read, each failure one ConfigError line.

`verify_checkpoint` looks at the files only: the COMPLETE marker, meta.json, DCP's `.metadata`, and that every
shard file `.metadata` points into exists and is long enough for the byte ranges it lists (a truncated copy or a
lost file is named here instead of surfacing as an unpickling or short-read error deep inside torch).
`check_compatible` compares the tensors a checkpoint holds with those of the model about to receive them.

DCP's `.metadata` is a pickle of DCP's own metadata classes, and torch 2.13's `FileSystemReader.read_metadata`
reads it with a plain `pickle.load`, which would run whatever a crafted file asks for. `read_dcp_metadata` (and
`SafeFileSystemReader`, for `dcp.load`) reads it with an unpickler that only builds the classes such a file holds.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md

from framework.config.errors import ConfigError

DCP_METADATA = ".metadata"
_FIX_RESAVE = (
    "resume from an earlier complete checkpoint (`loom train --resume PATH`), or copy this one again"
)
_SHOWN_KEYS = 3

# Every global a DCP `.metadata` written by torch 2.13 refers to: DCP's dataclasses, torch.Size, tensor layouts
# (rebuilt by name), paths (StorageMeta.checkpoint_id). torch dtypes (`torch.float32`...) are allowed separately.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata objects and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not a DCP metadata class)")


def _error(path: Path, rule: str, fix: str = _FIX_RESAVE) -> ConfigError:
    return ConfigError(None, "checkpoint", str(path), rule, fix)


def read_dcp_metadata(step_dir: str | Path) -> dcp_md.Metadata:
    """The `.metadata` of a DCP directory, unpickled with the restricted unpickler (ConfigError if unreadable)."""
    path = Path(step_dir) / DCP_METADATA
    if not path.is_file():
        raise _error(
            Path(step_dir), f"has no {DCP_METADATA} (the tensor index torch.distributed.checkpoint writes)"
        )
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # noqa: BLE001 - any failure to parse means the same thing to the user
        raise _error(
            path.parent, f"its {DCP_METADATA} is unreadable ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(metadata, dcp_md.Metadata):
        raise _error(path.parent, f"its {DCP_METADATA} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """dcp.FileSystemReader whose `.metadata` goes through the restricted unpickler (tensor data itself is read by
    torch with `torch.load(weights_only=True)`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        if kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)  # per-rank metadata files: not written by Loom
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as the parent does
        return metadata


def verify_checkpoint(path: str | Path) -> None:
    """Raise a one-line ConfigError unless the step directory `path` is complete and its files intact."""
    from framework.checkpoint.io import MARKER, META  # here, not above: io.py may import this module

    path = Path(path)
    if not path.is_dir():
        raise _error(path, "is not a directory", "pass a step_XXXXXXXX checkpoint directory")
    if not (path / MARKER).is_file():
        rule = f"is not a complete checkpoint: no {MARKER} marker (an interrupted save, or not a checkpoint)"
        raise _error(path, rule, "pass a checkpoint directory that has a COMPLETE marker")
    read_meta_json(path / META)
    metadata = read_dcp_metadata(path)
    _refuse_byte_entries(path, metadata)
    problems = storage_problems(path, metadata)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _error(path, f"{problems[0]}{more}")


def read_meta_json(path: Path) -> dict[str, Any]:
    """meta.json as a dict, or a ConfigError saying why it cannot be read."""
    if not path.is_file():
        raise _error(path.parent, f"has no {path.name}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _error(path.parent, f"its {path.name} is unreadable ({error})") from None
    if not isinstance(value, dict):
        raise _error(path.parent, f"its {path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def _refuse_byte_entries(path: Path, metadata: dcp_md.Metadata) -> None:
    # DCP loads non-tensor entries with torch.load(weights_only=False), i.e. unpickles them; Loom writes none.
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, dcp_md.BytesStorageMetadata):
            rule = f"holds a pickled (non-tensor) entry {key!r}, which Loom never writes or loads"
            raise _error(path, rule, "load only checkpoints written by Loom")


def storage_problems(path: Path, metadata: dcp_md.Metadata) -> list[str]:
    """One sentence per shard file `.metadata` names that is missing or shorter than its byte ranges need."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        # filesystem._StorageInfo(relative_path, offset, length): where each chunk's bytes lie
        name, end = info.relative_path, info.offset + info.length
        needed[name] = max(needed.get(name, 0), end)
    problems = []
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"shard file {name} is missing")
        elif file.stat().st_size < size:
            problems.append(
                f"shard file {name} is truncated: {file.stat().st_size} bytes, the index needs {size}"
            )
    return problems


def check_compatible(
    path: str | Path, template: Mapping[str, Any], prefix: str = "model/", *, partial: bool = False
) -> None:
    """ConfigError unless the checkpoint holds the same `prefix` keys as `template` with the same global shapes,
    and every other key both hold has the same global shape.

    `template` is a state as save_checkpoint takes it (nested dicts; DTensors count by their global shape), or
    already flat with '/'-joined keys. Keys outside `prefix` may be absent on either side (an optimizer that has
    not stepped yet has no moments). `partial`: the template is part of the model (a pipeline stage's layers), so
    checkpoint keys it lacks are expected; missing keys and shape differences still count."""
    ours = {k: tuple(v.shape) for k, v in _flat_tensors(template).items()}
    theirs = {
        k: tuple(item.size)
        for k, item in read_dcp_metadata(path).state_dict_metadata.items()
        if isinstance(item, dcp_md.TensorStorageMetadata)
    }
    differences = _differences(ours, theirs, prefix, partial)
    if differences:
        shown = "; ".join(differences[:_SHOWN_KEYS])
        more = f" (+{len(differences) - _SHOWN_KEYS} more)" if len(differences) > _SHOWN_KEYS else ""
        rule = f"holds another model than the one being loaded: {shown}{more}"
        fix = "load it with the recipe it was saved with (its meta.json 'recipe'), or start a fresh run"
        raise _error(Path(path), rule, fix)


def _flat_tensors(template: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from framework.checkpoint.tree import split_tensors

    if all(isinstance(v, torch.Tensor) for v in template.values()):
        return dict(template)  # already flat ('/' in keys would make split_tensors refuse it)
    return split_tensors(template)[0]


def _differences(ours: dict[str, tuple], theirs: dict[str, tuple], prefix: str, partial: bool) -> list[str]:
    found = []
    for key in sorted(ours.keys() | theirs.keys()):
        mine, saved = ours.get(key), theirs.get(key)
        if mine is not None and saved is not None and mine != saved:
            found.append(f"{key} is {list(saved)} in the checkpoint, {list(mine)} in the model")
        elif key.startswith(prefix) and saved is None:
            found.append(f"{key} {list(mine)} is missing from the checkpoint")
        elif key.startswith(prefix) and mine is None and not partial:
            found.append(f"{key} {list(saved)} is in the checkpoint but not in the model")
    return found
