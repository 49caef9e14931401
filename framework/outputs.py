"""The one rule for every command that writes (train, data tokenizer/prepare, ckpt consolidate, convert, submit).

1. Outputs are written into a temporary sibling and renamed into place, so an output path only ever holds a
   finished result (rename is atomic within one filesystem; the temp sibling is on the same one).
2. An output path that exists and is not empty is refused, unless the user passes `--overwrite`, which replaces
   it whole (the old one is moved aside, the new one renamed in, then the old one deleted) -- never a mix.
3. An output that is one of the inputs, or that contains one or lies inside one, is always refused.
4. Cleanup deletes only what Loom itself created: a temporary directory is recognised by the marker file
   `OWNER_MARK` written into it right after it was made, never by a name pattern (a user's own `.tmp-x` survives).
   A temporary *file* has no room for a marker: it is deleted by the process that made it, in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from framework.config.errors import ConfigError

OWNER_MARK = ".loom-owned"
"""A JSON file {"kind", "host", "pid"} inside every temporary directory Loom creates."""


def mark_owned(directory: Path, kind: str) -> None:
    """Record that Loom created `directory` (for `kind`, e.g. "checkpoint-save"), so cleanup may delete it."""
    record = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid()}
    (Path(directory) / OWNER_MARK).write_text(json.dumps(record) + "\n")


def owned_kind(directory: Path) -> str | None:
    """The kind Loom recorded in `directory`, or None when Loom did not create it (no readable marker)."""
    mark = Path(directory) / OWNER_MARK
    try:
        return str(json.loads(mark.read_text())["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_if_owned(path: Path, kind: str | None = None) -> bool:
    """Delete the directory `path` only if Loom's marker is in it (and names `kind`, when given)."""
    found = owned_kind(path) if Path(path).is_dir() and not Path(path).is_symlink() else None
    if found is None or (kind is not None and found != kind):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_output(
    out: str | Path,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    key: str = "OUT",
    file: str = "command line",
    want_dir: bool = True,
) -> Path:
    """Refuse an output that is an input (or holds one, or lies inside one) and, without `overwrite`, one that
    exists and is not an empty folder. Returns `out` as a Path. Call before any work, so a refusal costs
    nothing and writes nothing."""
    out = Path(out)
    target = _resolved(out)
    for item in inputs:
        source = _resolved(item)
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            rule = f"is (or holds, or lies inside) the input {item}, which would be overwritten"
            raise ConfigError(file, key, str(out), rule, "write the output somewhere else")
    if target.exists() or out.is_symlink():
        _check_existing(out, overwrite, key, file, want_dir)
    return out


def _check_existing(out: Path, overwrite: bool, key: str, file: str, want_dir: bool) -> None:
    kind = "folder" if want_dir else "file"
    if want_dir and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        what = "a folder" if out.is_dir() else "a file"
        rule = f"already exists ({what}, not empty); refusing to write over it"
        raise ConfigError(file, key, str(out), rule, f"pass a new {kind}, or --overwrite to replace it whole")
    if want_dir != out.is_dir():
        what = "a folder" if out.is_dir() else "a file"
        rule = f"is {what}; the output is a {kind}, so even --overwrite will not replace it"
        raise ConfigError(file, key, str(out), rule, f"pass a {kind} path")


@contextlib.contextmanager
def atomic_dir(out: str | Path, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory beside `out` (marked as Loom's); when the block succeeds it becomes
    `out` (replacing it whole if `overwrite`); when it fails it is deleted and `out` is untouched.
    Call `check_output` first: this only enforces the rename protocol."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.loom-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    mark_owned(tmp, kind)
    try:
        yield tmp
        (tmp / OWNER_MARK).unlink()
        fsync_tree(tmp)
        replace_whole(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside the file `out`; when the block succeeds the file there (fsynced) is
    renamed onto `out`; when it fails it is deleted and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.loom-tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        fsync_file(tmp)
        if out.exists() and not overwrite:
            raise ConfigError("command line", "OUT", str(out), "appeared while writing", "pass a new file")
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def replace_whole(new: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished directory `new` onto `out`. An existing `out` (allowed only with `overwrite`, or when
    empty) is moved aside first and deleted after, so `out` is always the old one whole or the new one whole."""
    aside = None
    if out.exists() or out.is_symlink():
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not (empty or overwrite):
            raise ConfigError("command line", "OUT", str(out), "appeared while writing", "pass a new folder")
        aside = out.parent / f".{out.name}.loom-old-{uuid.uuid4().hex[:8]}"
        os.replace(out, aside)
    os.replace(new, out)
    fsync_dir(out.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


def move_aside(path: Path) -> Path:
    """Rename `path` to a free sibling `<name>.old-N` (kept, never deleted); returns the new path."""
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.name}.old-{n}")
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise ConfigError(None, "path", str(path), "has 9999 old copies beside it", "delete some of them")


def read_json_file(path: str | Path, what: str, *, key: str = "file") -> Any:
    """Parse the JSON file `path` (a `what`, e.g. "checkpoint meta.json"); a missing, unreadable or malformed
    file is one ConfigError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(None, key, str(path), f"{what} is missing", "check the path") from None
    except OSError as error:
        raise ConfigError(
            None, key, str(path), f"{what} cannot be read ({error.strerror})", "check it"
        ) from None
    except (UnicodeDecodeError, ValueError) as error:
        rule = f"{what} is not valid JSON ({type(error).__name__}: {error})"
        raise ConfigError(None, key, str(path), rule, "restore the file, or pass another") from None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (directories too: their entries are what rename relies on)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))


def describe_os_error(error: OSError) -> str:
    """One line for an OSError at the CLI boundary: errno's words and the path(s)."""
    words = error.strerror or os.strerror(error.errno or 0) or type(error).__name__
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    where = " -> ".join(str(p) for p in paths)
    return f"{where}: {words}" if where else f"{words}: {error}"
