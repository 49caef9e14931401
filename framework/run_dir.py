"""The run directory of `loom train`: refused when it would mix two runs, moved aside whole on `--overwrite`, and
held by an advisory lock while a run writes into it (docs/launch.md, "One run per run directory").

Who does this: the process that owns the run, before any worker writes -- the one `loom train` process, or the
launcher of `--nproc N` (node 0's with several machines), which tells its workers so through LAUNCHED_ENV.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from framework.checkpoint.io import complete_checkpoints, resolve_checkpoint
from framework.config.errors import ConfigError
from framework.config.schema import Recipe
from framework.outputs import move_aside

log = logging.getLogger(__name__)

LOCK_NAME = ".loom-lock"
"""The lock file in the run directory (and in a checkpoint.dir outside it): flock'ed while a run writes, and
holding the holder's {"host", "pid", "started"} so a refusal can name it."""
LAUNCHED_ENV = "LOOM_LAUNCHED"
"""Set by Loom's launcher (launcher/local.py) for its workers: it checked the run directory and holds its lock,
and it turns a preempted run's exit into EXIT_PREEMPTED from the preemption record."""

_NEW_RUN_FIX = "pass --resume auto to continue it, a new logging.run_dir, or --overwrite to move it aside"


def _folders(recipe: Recipe) -> dict[str, Path]:
    """The folders a run owns, by the recipe key that names them: the run dir, and checkpoint.dir when it lies
    outside the run dir (inside it, it moves and locks with the run dir)."""
    run_dir = Path(recipe.logging.run_dir)
    folders = {"logging.run_dir": run_dir}
    root = recipe.checkpoint_root()
    if not root.resolve().is_relative_to(run_dir.resolve()):
        folders["checkpoint.dir"] = root
    return folders


def check_run_dir(recipe: Recipe, *, resume: str | None, overwrite: bool) -> None:
    """Every refusal that needs no write: a folder path that is a file, `--overwrite` with `--resume`, and a new
    run (no --resume, no --overwrite) into a checkpoint folder that holds committed checkpoints."""
    keys = {"logging.run_dir": Path(recipe.logging.run_dir), "checkpoint.dir": recipe.checkpoint_root()}
    for key, path in keys.items():
        _refuse_file(key, path)
    if overwrite and resume is not None:
        raise ConfigError(
            "command line", "--overwrite", "--resume " + resume,
            "--overwrite starts a new run (the old one moved aside), --resume continues the old one",
            "pass one of them",
        )  # fmt: skip
    committed = complete_checkpoints(keys["checkpoint.dir"])
    if committed and resume is None and not overwrite:
        steps = ", ".join(str(step) for step, _ in committed[-3:])
        rule = f"already holds checkpoints of a run (steps {steps}); a new run there would mix with them"
        raise ConfigError(None, "checkpoint.dir", str(keys["checkpoint.dir"]), rule, _NEW_RUN_FIX)


def _refuse_file(key: str, path: Path) -> None:
    """`path` (or a folder above it) exists and is not a folder: one ConfigError naming it."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "is a file" if part == path else f"lies under {part}, which is a file"
                raise ConfigError(None, key, str(path), f"{what}, not a folder", "pass a folder path")
            return


@contextlib.contextmanager
def guard_run_dir(
    recipe: Recipe, *, resume: str | None, overwrite: bool, accept_data_change: bool = False
) -> Iterator[None]:
    """Check the run's folders (check_run_dir), move them aside with `overwrite`, and hold their locks for the
    block. A folder another run holds is refused with that run's host and pid. A resume that would change what
    data comes next is refused here already, before the run writes anything (the Checkpointer checks the
    checkpoint it finally loads again, on every rank)."""
    check_run_dir(recipe, resume=resume, overwrite=overwrite)
    folders = _folders(recipe)
    if overwrite:
        for key, folder in folders.items():
            _refuse_moving_inputs(recipe, key, folder)
        for key, folder in folders.items():
            _move_aside_unlocked(key, folder)
    with contextlib.ExitStack() as stack:
        for key, folder in folders.items():
            stack.enter_context(run_lock(folder, key))
        # Under the locks, again: a run that started between the first check and the lock has written by now.
        check_run_dir(recipe, resume=resume, overwrite=False)
        if resume is not None and not accept_data_change:
            _check_resume_data(recipe, resume)
        yield


def _check_resume_data(recipe: Recipe, resume: str) -> None:
    """The data check against the checkpoint a resume will most likely load: the newest committed one for
    "auto" (the Checkpointer may fall back to an older one that verifies, and checks that one), or `resume`."""
    from framework.config.loader import recipe_to_dict
    from framework.train.resume_check import check_same_data

    committed = complete_checkpoints(recipe.checkpoint_root())
    if resume == "auto" and not committed:
        return
    path = committed[-1][1] if resume == "auto" else resolve_checkpoint(resume)
    check_same_data(path, recipe_to_dict(recipe))


def _refuse_moving_inputs(recipe: Recipe, key: str, folder: Path) -> None:
    """--overwrite never moves the run's own inputs (data, tokenizer) or the working directory away."""
    data = recipe.data
    train = data.train if isinstance(data.train, list) else [data.train]
    inputs = [
        Path.cwd(),
        Path(data.tokenizer),
        *map(Path, train),
        *([Path(data.validation)] if data.validation else []),
    ]
    targets = (folder.resolve(), folder.absolute())
    for item in inputs:
        # by the path as written too: a link inside the folder to data elsewhere would move (and break) with it
        if any(p.is_relative_to(t) for p in (item.resolve(), item.absolute()) for t in targets):
            rule = f"holds {item}, an input of this run (or the working directory): --overwrite would move it away"
            raise ConfigError(None, key, str(folder), rule, "use a new logging.run_dir (or checkpoint.dir)")


def _move_aside_unlocked(key: str, folder: Path) -> None:
    """Rename a non-empty `folder` to `<folder>.old-N` (kept whole), unless a running run holds it."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    with run_lock(folder, key, create=False):
        aside = move_aside(folder)
    log.warning("--overwrite: moved the old %s %s aside to %s (kept)", key, folder, aside)


@contextlib.contextmanager
def run_lock(folder: Path, key: str = "logging.run_dir", *, create: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `<folder>/.loom-lock` (made, with `folder`, when `create`) for the block; one
    ConfigError naming the holder when another process holds it. The kernel releases a flock when its process
    dies, so a lock file left by a killed run does not block. On NFS, Linux emulates flock with byte-range locks
    the server arbitrates; where a filesystem cannot lock, two runs are not kept apart (docs/launch.md)."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if not create and not path.exists():
        yield  # nothing to hold: no run ever locked this folder (or it predates locks)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, key, folder, path):
            yield  # this filesystem cannot lock (warned): the run goes on unguarded, as before locks
            return
        _write_holder(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the next reader sees no holder (the file stays: deleting it would race)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _flock(fd: int, key: str, folder: Path, path: Path) -> bool:
    """Take the lock (True); False, with a warning, where the filesystem has no locks (e.g. Lustre mounted
    without -o flock: ENOSYS; NFS without lockd: ENOLCK). Held by another process: the one-line refusal."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(key, folder, path) from None
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.warning(
            "%s %s: cannot be locked here (%s): a second run there is not refused", key, folder, error
        )
        return False
    return True


def _write_holder(fd: int) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def lock_holder(folder: Path) -> dict[str, object]:
    """The holder record of `folder`'s lock file ({} when none can be read)."""
    try:
        record = json.loads((folder / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _locked_error(key: str, folder: Path, path: Path) -> ConfigError:
    holder = lock_holder(folder)
    who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    since = f", since {holder['started']}" if "started" in holder else ""
    rule = f"is in use by another loom train ({who}{since}; lock {path})"
    return ConfigError(None, key, str(folder), rule, "wait for that run to end, or use a new logging.run_dir")
