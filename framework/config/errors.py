"""The one error type for user mistakes.

Every mistake a user can make in a recipe, a `--set` override, a data file or the command line is reported as a
`ConfigError` that names where it happened (file and dotted key), what was given, the rule it breaks and how to fix
it. The CLI prints `str(error)` on one line and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A user mistake, with enough context to fix it without reading a traceback."""

    def __init__(self, file: str | None, key: str, value: Any, rule: str, fix: str) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.rule = rule
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}: " if self.file else ""
        value = _short_repr(self.value)
        text = f"{where}{self.key} = {value}: {self.rule}"
        if self.fix:
            text += f"; fix: {self.fix}"
        # One line: the CLI prints this as is.
        return " ".join(text.split("\n"))


def _short_repr(value: Any, limit: int = 160) -> str:
    # Cut from the middle: a long path keeps its start and, what names the culprit, its file name.
    text = repr(value)
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return text[:keep] + "..." + text[-keep:]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A fix hint naming the closest valid choice, or listing the choices when none is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(choices)


def first_line(error: BaseException | None, limit: int = 240) -> str:
    """The start of an error's text on one line: its first line, and the next when the first ends in ':'
    (where transformers and huggingface_hub put the detail)."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."
