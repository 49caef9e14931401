"""Atomic directory checkpoints.

Layout under the checkpoint root:
    step_00000100/       one committed checkpoint
        __0_0.distcp, .metadata   tensors (model, optimizer state) written by torch.distributed.checkpoint
        meta.json        format version, step, tokens, recipe, data-loader and RNG state, the non-tensor state
        MANIFEST.json    {file: {bytes, sha256}} of every file above, hashed while DCP wrote it (manifest.py)
        COMPLETE         written last ({step, manifest_sha256}): a directory without it is never loaded
    latest               name of the newest committed step directory (replaced atomically)

A save writes everything into a hidden temp directory beside the target, fsyncs every file and directory, writes
the marker, and only then renames the directory into place (rename is atomic within one filesystem) and updates
`latest` by write-temp + fsync + rename. A crash or an exception at any point leaves the previous checkpoint and
`latest` untouched and no half-written step directory visible. Nothing is pickled: DCP receives tensors only (it
stores each in torch's tensor format and reads it back with torch.load(weights_only=True)); everything else is JSON.

Every temporary directory a save, a prune or a `latest` update makes is marked as Loom's right after mkdir
(framework.outputs.mark_owned), and cleanup deletes only marked ones: a user's own `.tmp-mine/` survives.
Multi-rank saves: writer.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
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

from framework.checkpoint.manifest import MANIFEST, HashingWriter, write_manifest
from framework.checkpoint.tree import merge_tensors, split_tensors
from framework.config import ConfigError
from framework.outputs import OWNER_MARK, mark_owned, remove_if_owned
from framework.outputs import fsync_dir as _fsync_dir
from framework.outputs import fsync_tree as _fsync_tree

FORMAT_VERSION = 1
MARKER = "COMPLETE"
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_KEY = "loom/step"
"""The step, saved as a tensor too, so an edited meta.json step is caught against the checkpoint's own data."""
TEMP_KIND = "checkpoint-temp"
"""The owner-marker kind of every temporary directory under a checkpoint root (saves, trash, `latest` updates)."""
STEP_DIR = re.compile(r"^step_(\d{8,})$")
"""A committed step directory's name (step_dir_name's form)."""


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
    tmp = make_temp_dir(root, f"{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tensors, plain = split_tensors(state)
    writer = HashingWriter(tmp, rank=0)
    try:
        _write_contents(tmp, step, tensors, meta_record(step, plain, dict(metadata or {})), writer)
        _commit_dir(tmp, final)
    except BaseException as error:
        remove_if_owned(tmp, TEMP_KIND)
        raise_save_failure(error, final, tensors, writer.fs.error)
    _write_latest(root, final.name)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def _write_contents(
    tmp: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], writer: HashingWriter
) -> None:
    with _single_process():
        dcp.save(with_step_tensor(tensors, step), storage_writer=writer, no_dist=True)
    _write_json(tmp / META, meta)
    seal(tmp, step)


def with_step_tensor(tensors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The tensors to save, plus the step as a tensor (cross-checked against meta.json by verify)."""
    return {**tensors, STEP_KEY: torch.tensor(step, dtype=torch.int64)}


def seal(tmp: Path, step: int) -> None:
    """The last writes of a save: the manifest of every file's hash, then COMPLETE naming the manifest's hash
    (fsynced before and after: its presence means everything above is on disk)."""
    _fsync_tree(tmp)
    manifest_sha = write_manifest(tmp, skip=frozenset({MARKER, MANIFEST}))
    _write_json(tmp / MARKER, {"step": step, "manifest_sha256": manifest_sha})
    _fsync_dir(tmp)


def make_temp_dir(root: Path, name: str, *, exist_ok: bool = False) -> Path:
    """<root>/.tmp-<name>, marked as Loom's at once, so cleanup may delete it and nothing else."""
    tmp = root / f"{TMP_PREFIX}{name}"
    tmp.mkdir(parents=True, exist_ok=exist_ok)
    mark_owned(tmp, TEMP_KIND)
    return tmp


def raise_save_failure(
    error: BaseException, final: Path, tensors: dict[str, torch.Tensor], seen: OSError | None
) -> None:
    """Raise what `save_failure` makes of `error` (the error itself as it was, when nothing better)."""
    failure = save_failure(error, final, tensors, seen)
    if failure is error:
        raise error
    raise failure from error


def save_failure(error: BaseException, final: Path, tensors: dict[str, torch.Tensor], seen: OSError | None):
    """What a failed save raises: a full disk is one line saying so, where, and how much the save needs; another
    OSError is itself (the CLI prints it as one line); anything else a CheckpointError."""
    cause = _os_error(error) or seen
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        rule = (
            f"{os.strerror(cause.errno)} while saving {final.name} (the save needs about {_human_bytes(needed)}, "
            f"{needed} bytes of tensors, plus small JSON files); the partial checkpoint was removed"
        )
        fix = "free space on that disk, or set checkpoint.dir to one with room (older checkpoints are intact)"
        return ConfigError(None, "checkpoint.dir", str(final.parent), rule, fix)
    if cause is not None:
        return cause
    if isinstance(error, CheckpointException):
        return CheckpointError(f"saving checkpoint {final} failed: {error}")
    return error


def _os_error(error: BaseException | None, depth: int = 0) -> OSError | None:
    """The OSError behind `error`: itself, one a CheckpointException gathered from a rank, or its cause."""
    if error is None or depth > 8:
        return None
    if isinstance(error, OSError):
        return error
    if isinstance(error, CheckpointException):
        for exc, _ in error.failures.values():
            if (found := _os_error(exc, depth + 1)) is not None:
                return found
    return _os_error(error.__cause__ or error.__context__, depth + 1)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def meta_record(step: int, plain: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """meta.json's content: the caller's metadata, the format version, the step, and the state's non-tensor part."""
    return {**metadata, "format_version": FORMAT_VERSION, "step": step, "state": plain}


def _commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        # rename() cannot replace a non-empty directory: mark the old one as Loom's trash (marked before the
        # rename: a crash leaves a marker in a committed directory, which is harmless), move it aside, delete it.
        mark_owned(final, TEMP_KIND)
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        remove_if_owned(old, TEMP_KIND)
    else:
        os.replace(tmp, final)
    (final / OWNER_MARK).unlink(missing_ok=True)  # a committed directory is not a temp
    _fsync_dir(final)
    _fsync_dir(final.parent)


def _write_latest(root: Path, name: str) -> None:
    # A temp *directory* (marked), not a temp file: a crash leaves something cleanup can recognise as Loom's.
    tmp = make_temp_dir(root, f"{LATEST}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp / LATEST, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / LATEST, root / LATEST)
        _fsync_dir(root)
    finally:
        remove_if_owned(tmp, TEMP_KIND)


def prune_checkpoints(root: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete all but the newest `keep_last` committed step directories, never the one `latest` names nor (with
    keep_every = M > 0) a step that is a multiple of M (kept for good: evaluation, a fallback far back)."""
    root = Path(root)
    latest = _read_latest(root)
    older = complete_checkpoints(root)[:-keep_last]
    doomed = [p for s, p in older if p.name != latest and not (keep_every and s % keep_every == 0)]
    for path in doomed:
        # Mark, then rename, so a crash mid-delete never leaves a half-deleted step_* directory, and the
        # trash is recognisably Loom's.
        mark_owned(path, TEMP_KIND)
        trash = root / f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        remove_if_owned(trash, TEMP_KIND)
    return doomed


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Delete the temp directories of saves, prunes and `latest` updates that crashed: only those Loom marked
    (a user's own `.tmp-x` stays, and so does a step directory). Call only when no save is in flight."""
    root = Path(root)
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if not STEP_DIR.match(path.name) and remove_if_owned(path, TEMP_KIND):
            removed.append(path)
    return removed


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed step directory under root, oldest first."""
    root = Path(root)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR.match(path.name)
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
    from framework.checkpoint.verify import load_tensors, read_meta_json  # verify.py imports this module

    path = resolve_checkpoint(path)
    meta = read_meta_json(path / META)
    if meta.get("format_version") != FORMAT_VERSION:
        rule = f"has format version {meta.get('format_version')!r}; this code reads version {FORMAT_VERSION}"
        raise ConfigError(
            None, "checkpoint", str(path), rule, "use a checkpoint written by this version of Loom"
        )
    reader = _reader(path)
    wanted = split_tensors(template)[0] if template else {}
    targets = _present(reader, wanted) if distributed else _load_targets(reader, wanted)
    targets.pop(STEP_KEY, None)  # verify's cross-check of meta.json, not part of the caller's state
    load_tensors(targets, path, no_dist=not distributed)
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
