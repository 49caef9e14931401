"""The write rule (framework/outputs.py) as every conversion and consolidation applies it.

`check` runs before any (long) read, so a refusal costs nothing and writes nothing. `staged` then yields a
temporary sibling of OUT that becomes OUT whole when the block succeeds (replacing an old OUT whole with
--overwrite); when it fails, neither OUT nor the temporary folder nor any parent folder it had to create is left.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from framework.config.errors import ConfigError
from framework.outputs import atomic_dir, check_output


def check(out: str | Path, inputs: Iterable[str | Path | None], overwrite: bool) -> Path:
    """Refuse OUT if it is, holds or lies inside an input, or (without `overwrite`) exists and is not empty."""
    return check_output(out, inputs=[item for item in inputs if item is not None], overwrite=overwrite)


def require_source(source: str | Path, what: str) -> Path:
    """SOURCE as a Path; one line when it does not exist (before any output is looked at)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError("command line", "SOURCE", str(source), f"does not exist ({what})", "check the path")
    return path


@contextlib.contextmanager
def staged(out: str | Path, kind: str, *, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside OUT, renamed onto OUT when the block succeeds (see framework.outputs)."""
    created = _missing_parents(Path(out))
    try:
        with atomic_dir(out, kind, overwrite=overwrite) as tmp:
            yield tmp
    except BaseException:
        _remove_empty(created)
        raise


def _missing_parents(out: Path) -> list[Path]:
    """OUT's ancestors that do not exist yet, deepest first (atomic_dir creates them)."""
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; a folder something else wrote into meanwhile stays
        with contextlib.suppress(OSError):
            os.rmdir(folder)
