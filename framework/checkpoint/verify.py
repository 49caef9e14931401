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
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.api import CheckpointException

from framework.checkpoint.manifest import manifest_problems
from framework.config.errors import ConfigError, first_line
from framework.outputs import read_json_file

DCP_METADATA = ".metadata"
_FIX_RESAVE = (
    "resume from an earlier complete checkpoint (`loom train --resume PATH`), or copy this one again"
)
_FIX_PICKLE = "load only checkpoints written by Loom"
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


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Raise a one-line ConfigError unless the step directory `path` is complete and its files intact: markers,
    meta.json (cross-checked against COMPLETE, the directory name and the saved step tensor), every rank file,
    DCP's index (no pickled entries), shard sizes, and with `hashes` the sha256 of every file against the manifest
    recorded at commit. A checkpoint from before manifests loads with a warning that its contents are unverified.
    Returns {"files": n, "bytes": total, "hashes": "checked" | "sizes only" | "not recorded"}."""
    from framework.checkpoint.io import META

    path = Path(path)
    if not path.is_dir():
        raise _error(path, "is not a directory", "pass a step_XXXXXXXX checkpoint directory")
    complete = read_complete(path)
    hashed = manifest_problems(path, complete, hashes=hashes)
    if hashed:
        raise _error(path, _first(hashed))
    if hashed is None:
        warnings.warn(f"checkpoint {path} has no recorded file hashes (written by an older Loom): "
                      "its file sizes are checked, its contents cannot be verified", stacklevel=2)  # fmt: skip
    meta = read_meta_json(path / META)
    check_meta(path, meta, complete)
    check_rank_files(path)
    metadata = read_dcp_metadata(path)
    problems = byte_entry_problems(metadata) + storage_problems(path, metadata)
    if problems:
        raise _error(path, _first(problems), _FIX_PICKLE if "pickled" in problems[0] else _FIX_RESAVE)
    if hashes:
        check_step_tensor(path, metadata, meta["step"])
    files = [p for p in path.rglob("*") if p.is_file()]
    mode = "not recorded" if hashed is None else "checked" if hashes else "sizes only"
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "hashes": mode}


def verify_command(path: str | Path) -> str:
    """`loom ckpt verify PATH`: the one line saying what was checked (a damaged checkpoint: a ConfigError)."""
    from framework.checkpoint.io import META, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no recorded file hashes")  # said in the line below
        report = verify_checkpoint(step_dir, hashes=True)
    step = read_meta_json(step_dir / META)["step"]
    if report["hashes"] == "checked":
        what = "sha256 of every file matches the manifest"
    else:
        what = "sizes match; no file hashes recorded (written by an older Loom): contents not verified"
    return f"ok: {step_dir}: step {step}, {report['files']} files, {report['bytes']} bytes; {what}"


def _first(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def read_complete(path: Path) -> dict[str, Any]:
    """The COMPLETE marker's record ({"step", "manifest_sha256"}), or a ConfigError."""
    from framework.checkpoint.io import MARKER

    if not (path / MARKER).is_file():
        rule = f"is not a complete checkpoint: no {MARKER} marker (an interrupted save, or not a checkpoint)"
        raise _error(path, rule, "pass a checkpoint directory that has a COMPLETE marker")
    value = read_json_file(path / MARKER, f"checkpoint marker {MARKER}", key="checkpoint")
    if not isinstance(value, dict):
        raise _error(path, f"its {MARKER} holds a JSON {type(value).__name__}, not an object")
    return value


def read_meta_json(path: Path) -> dict[str, Any]:
    """meta.json as a dict holding a `step` and the non-tensor `state`, or a ConfigError saying why not."""
    if not path.is_file():
        raise _error(path.parent, f"has no {path.name}")
    value = read_json_file(path, f"checkpoint {path.name}", key="checkpoint")
    if not isinstance(value, dict):
        raise _error(path.parent, f"its {path.name} holds a JSON {type(value).__name__}, not an object")
    for key, kind in (("step", int), ("state", dict)):
        if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
            rule = f"its {path.name} has no {key!r} {kind.__name__} (got {type(value.get(key)).__name__})"
            raise _error(path.parent, rule)
    return value


def check_meta(path: Path, meta: dict[str, Any], complete: dict[str, Any]) -> None:
    """meta.json's step must agree with COMPLETE's and the directory name's (the step tensor: check_step_tensor)."""
    from framework.checkpoint.io import STEP_DIR  # here, not above: io.py imports this module

    name = STEP_DIR.match(path.name)
    witnesses = {"COMPLETE": complete.get("step"), "the directory name": int(name.group(1)) if name else None}
    for where, step in witnesses.items():
        if isinstance(step, int) and step != meta["step"]:
            _refuse_step(path, meta["step"], where, step)


def _refuse_step(path: Path, claimed: int, where: str, step: int) -> None:
    rule = f"its meta.json says step {claimed}, {where} says {step} (meta.json was edited or mixed up)"
    raise _error(path, rule)


def check_rank_files(path: Path) -> None:
    """Every rank_XXXXX.json parses and holds an RNG state that loads (tried on throwaway generators)."""
    from framework.checkpoint.rng import check_rng_state

    for file in sorted(path.glob("rank_*.json")):
        record = read_json_file(file, f"checkpoint rank file {file.name}", key="checkpoint")
        try:
            if not isinstance(record, dict):
                raise TypeError(f"it holds a JSON {type(record).__name__}, not an object")
            check_rng_state(record["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            rule = f"{file.name} is not a rank state Loom wrote ({type(error).__name__}: {error})"
            raise ConfigError(None, "checkpoint", str(file), rule, _FIX_RESAVE) from None


def check_step_tensor(path: Path, metadata: dcp_md.Metadata, claimed: int) -> None:
    """The step Loom saves as a tensor (read alone: 8 bytes) must be meta.json's."""
    from framework.checkpoint.io import STEP_KEY

    if not isinstance(metadata.state_dict_metadata.get(STEP_KEY), dcp_md.TensorStorageMetadata):
        return  # saved before the step tensor existed
    target = {STEP_KEY: torch.zeros((), dtype=torch.int64)}
    load_tensors(target, path, no_dist=True)
    if int(target[STEP_KEY]) != claimed:
        _refuse_step(path, claimed, "the saved step tensor", int(target[STEP_KEY]))


def load_tensors(targets: dict[str, torch.Tensor], path: Path, *, no_dist: bool) -> None:
    """dcp.load into `targets` through the safe reader; an unreadable chunk is one ConfigError naming the
    checkpoint (dcp_read_error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(targets, storage_reader=SafeFileSystemReader(path), no_dist=no_dist)
        except CheckpointException as error:
            raise dcp_read_error(path, error) from None


def refused_global(message: str) -> str | None:
    """The module.name of the global torch's weights-only unpickler refused, from its error message
    ("Unsupported global: GLOBAL fractions.Fraction was not...", "unsupported GLOBAL posix.system whose...")."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def dcp_read_error(
    directory: Path, error: CheckpointException, key: str = "checkpoint", fix: str = _FIX_RESAVE
) -> ConfigError:
    """One line for a failed DCP read of `directory` (Loom's or megatron's). DCP raises a CheckpointException (a
    BaseException, which the CLI's handlers miss) carrying each rank's own error; for a pickle where tensor data
    belongs that is torch's UnpicklingError, whose text advises weights_only=False. A pickle in a shard is damage
    or an attack, never a format to allow, so only the name of the global it asked for is kept."""
    cause = next((exc for exc, _ in error.failures.values()), error)
    if isinstance(cause, pickle.UnpicklingError):
        name = refused_global(str(cause))
        what = f" referring to {name}" if name else ""
        detail = f"a .distcp chunk holds a pickle{what}: a pickled object that is not a plain tensor; refused, not run"
    else:
        first = first_line(cause)
        detail = f"{type(cause).__name__}: {'not a tensor torch can read safely' if 'weights_only' in first else first}"
    return ConfigError(None, key, str(directory), f"its tensor data cannot be read ({detail})", fix)


def byte_entry_problems(metadata: dcp_md.Metadata) -> list[str]:
    """DCP loads non-tensor entries with torch.load(weights_only=False), i.e. unpickles them; Loom writes none."""
    return [
        f"holds a pickled (non-tensor) entry {key!r}, which Loom never writes or loads"
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, dcp_md.BytesStorageMetadata)
    ]


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
