"""Atomic directory checkpoints.

Layout under the checkpoint root:
    step_00000100/       one committed checkpoint
        __0_0.distcp, .metadata   tensors (model, optimizer state) written by torch.distributed.checkpoint
        meta.json        format version, step, tokens, recipe, data-loader and RNG state, the non-tensor state
        COMPLETE         written last: a directory without it is never loaded
    latest               name of the newest committed step directory (replaced atomically)

A save writes everything into a hidden temp directory beside the target, fsyncs every file and directory, writes
the marker, and only then renames the directory into place (rename is atomic within one filesystem) and updates
`latest` by write-temp + fsync + rename. A crash or an exception at any point leaves the previous checkpoint and
`latest` untouched and no half-written step directory visible. Nothing is pickled: DCP receives tensors only (it
stores each in torch's tensor format and reads it back with torch.load(weights_only=True)); everything else is JSON.

One process today; the multi-rank engine will have every rank write its shards into the same temp directory and
rank 0 commit after a barrier.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.tree import merge_tensors, split_tensors
from framework.config import ConfigError

FORMAT_VERSION = 1
MARKER = "COMPLETE"
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A save failed. (DCP's own CheckpointException derives from BaseException, which `except Exception` misses.)"""


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    """The nested state passed to save_checkpoint, tensors included."""
    metadata: dict[str, Any]
    """meta.json without the non-tensor state: format_version, step, and what the caller passed as metadata."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    state: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Commit `state` (nested dicts of tensors and JSON values) as <root>/step_XXXXXXXX; returns that path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_contents(tmp, step, state, dict(metadata or {}))
        _commit_dir(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, CheckpointException):
            raise CheckpointError(f"saving checkpoint {final} failed: {error}") from error
        raise
    _write_latest(root, final.name)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def _write_contents(tmp: Path, step: int, state: Mapping[str, Any], metadata: dict[str, Any]) -> None:
    tensors, plain = split_tensors(state)
    writer = dcp.FileSystemWriter(tmp, sync_files=True)
    with _single_process():
        dcp.save(tensors, storage_writer=writer, no_dist=True)
    _write_json(tmp / META, meta_record(step, plain, metadata))
    _fsync_tree(tmp)
    _write_json(tmp / MARKER, {"step": step})  # last file: its presence means everything above is on disk
    _fsync_dir(tmp)


def meta_record(step: int, plain: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """meta.json's content: the caller's metadata, the format version, the step, and the state's non-tensor part."""
    return {**metadata, "format_version": FORMAT_VERSION, "step": step, "state": plain}


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        # rename() cannot replace a non-empty directory: move the old one aside, then delete it.
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def prune_checkpoints(root: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the newest `keep_last` committed step directories, never the one `latest` names nor (with
    keep_every = M > 0) a step that is a multiple of M (kept for good: evaluation, a fallback far back)."""
    root = Path(root)
    latest = _read_latest(root)
    older = complete_checkpoints(root)[:-keep_last]
    doomed = [p for s, p in older if p.name != latest and not (keep_every and s % keep_every == 0)]
    for path in doomed:
        # Rename first so a crash mid-delete never leaves a half-deleted step_* directory.
        trash = root / f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def remove_stale_temps(root: str | Path) -> None:
    """Delete temp leftovers of saves that crashed. Call only when no save is in flight."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob(f"{TMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed step directory under root, oldest first."""
    root = Path(root)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory `latest` names, if it is complete."""
    name = _read_latest(Path(root))
    path = Path(root) / name if name else None
    return path if path is not None and (path / MARKER).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as is, or a checkpoint root via its `latest` file; refuses anything incomplete."""
    path = Path(path)
    fix = (
        "pass a step_XXXXXXXX directory that has a COMPLETE marker, or the checkpoint root (follows 'latest')"
    )
    if not path.is_dir():
        raise ConfigError(None, "checkpoint", str(path), "no such checkpoint directory", fix)
    name = _read_latest(path)
    if name is not None:
        path = path / name
    if not (path / MARKER).is_file():
        rule = f"is not a complete checkpoint: no {MARKER} marker (an interrupted save, or not a checkpoint)"
        raise ConfigError(None, "checkpoint", str(path), rule, fix)
    return path


def load_checkpoint(
    path: str | Path, template: Mapping[str, Any] | None = None, *, distributed: bool = False
) -> LoadedCheckpoint:
    """Read a committed checkpoint. Tensors load in place into same-shaped tensors of `template` (e.g. the live
    state_dict(), so parameters are filled without a copy); others are allocated on the CPU.

    `distributed`: every rank of the default process group calls this with its own template (DTensor shards,
    a pipeline stage's layers) and loads exactly the template's keys, resharded from whatever layout saved them;
    keys the template lacks (other stages' layers) are not read."""
    path = resolve_checkpoint(path)
    meta = _read_json(path / META)
    if meta.get("format_version") != FORMAT_VERSION:
        rule = f"has format version {meta.get('format_version')!r}; this code reads version {FORMAT_VERSION}"
        raise ConfigError(
            None, "checkpoint", str(path), rule, "use a checkpoint written by this version of Loom"
        )
    reader = _reader(path)
    wanted = split_tensors(template)[0] if template else {}
    if distributed:
        targets = _present(reader, wanted)
        dcp.load(targets, storage_reader=reader)
    else:
        targets = _load_targets(reader, wanted)
        with _single_process():
            dcp.load(targets, storage_reader=reader, no_dist=True)
    state = merge_tensors(meta.pop("state"), targets)
    return LoadedCheckpoint(path=path, state=state, metadata=meta)


def _reader(path: Path) -> dcp.FileSystemReader:
    """DCP's reader, with its metadata file read through the restricted unpickler of verify.py."""
    from framework.checkpoint.verify import SafeFileSystemReader

    return SafeFileSystemReader(path)


def _present(reader: dcp.FileSystemReader, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The template's tensors the checkpoint has (the caller checked the model keys beforehand; optimizer
    moments of parameters that never stepped may be absent on both sides)."""
    saved = reader.read_metadata().state_dict_metadata
    return {k: v for k, v in wanted.items() if k in saved}


@contextmanager
def _single_process() -> Iterator[None]:
    # DCP warns when no process group exists; one process without one is exactly the intended use here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _load_targets(reader: dcp.FileSystemReader, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    targets = {}
    for key, item in reader.read_metadata().state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        live = template.get(key)
        if live is not None and live.shape == item.size:
            targets[key] = live
        else:
            targets[key] = torch.empty(item.size, dtype=item.properties.dtype)
    return targets


def _read_latest(root: Path) -> str | None:
    latest = root / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (directories too: their entries are what rename relies on)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
