"""One line for shard data torch cannot load, as conversion and consolidation read it.

torch.distributed.checkpoint raises a CheckpointException (a BaseException, so the CLI's handlers miss it) that
carries each rank's own error; for a pickle where tensor data belongs that is torch's UnpicklingError, whose text
advises loading with weights_only=False. A pickle in a shard is damage or an attack, never a format to allow, so
only the name of the global it asked for is kept.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from framework.config.errors import ConfigError

SHARD_SUFFIX = ".distcp"


def refused_global(message: str) -> str | None:
    """The module.name of the global torch's weights-only unpickler refused, from its error message
    ("Unsupported global: GLOBAL fractions.Fraction was not...", "unsupported GLOBAL posix.system whose...")."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def first_line(error: BaseException | None, limit: int = 240) -> str:
    """The start of an error's text on one line: its first line, and the next when the first ends in ':'
    (where transformers and huggingface_hub put the detail)."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def shard_read_errors(directory: str | Path, key: str = "source") -> Iterator[None]:
    """Turn a failed DCP read of the checkpoint `directory` into one ConfigError naming it."""
    try:
        yield
    except CheckpointException as error:
        raise unreadable(Path(directory), error, key) from None


def unreadable(directory: Path, error: CheckpointException, key: str = "source") -> ConfigError:
    cause = next((exc for exc, _ in error.failures.values()), None)
    if isinstance(cause, pickle.UnpicklingError):
        name = refused_global(str(cause))
        what = f" referring to {name}" if name else ""
        rule = f"a {SHARD_SUFFIX} shard holds a pickle{what} where tensor data belongs (not unpickled)"
    else:
        rule = f"its {SHARD_SUFFIX} tensor data is unreadable ({type(cause).__name__}: {first_line(cause)})"
    return ConfigError(None, key, str(directory), rule, "copy the checkpoint again from a source you trust")
