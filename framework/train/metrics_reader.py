"""Read back a run's <run_dir>/metrics.jsonl (written by callbacks/metrics_logger.py) as one clean history.

The file is appended to by every start of the run, so a resume repeats steps: resuming from the checkpoint of step
c after a crash at step n > c logs steps c+1 .. again. The history keeps what the surviving run did: a record whose
step is not after the previous record of its kind starts a new segment, and the earlier records of that kind from
its step on are dropped (so every step keeps its last record, and the steps an older segment logged past the point
where a resumed one stopped are dropped too: they belong to a trajectory that was abandoned).

Only "train" and "val" records are read; other kinds (e.g. a run summary) are skipped. A last line without its
newline that does not parse is the normal result of a killed writer: it is skipped with a warning. Any other line
that is not a JSON object is a ConfigError naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.config.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
KINDS = ("train", "val")
"""The record kinds the history keeps."""


@dataclass
class RunHistory:
    """One run's records of each kind, by increasing step, after the resume rule (module docstring)."""

    run_dir: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def metrics_path(run_dir: str | Path) -> Path:
    """<run_dir>/metrics.jsonl; a run dir that is not a folder or has no such file is a ConfigError."""
    run_dir = Path(run_dir)
    fix = "pass the logging.run_dir of a `loom train` run (with logging.jsonl: true)"
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise ConfigError("command line", "RUN_DIR", str(run_dir), what, fix)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError("command line", "RUN_DIR", str(run_dir), f"holds no {METRICS_FILE}", fix)
    return path


def read_history(run_dir: str | Path) -> RunHistory:
    """The run's train and val history; a file with neither kind of record is a ConfigError."""
    path = metrics_path(run_dir)
    history = RunHistory(Path(run_dir))
    for number, record in _records(path, history.warnings):
        kind = record.get("kind")
        if kind in KINDS:
            _append(getattr(history, kind), record, path, number)
    if not history.train and not history.val:
        rule = "holds no train or val records (the run logged no step yet?)"
        raise ConfigError(None, "metrics", str(path), rule, "plot a run that has logged at least one step")
    return history


def _records(path: Path, warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) of every non-blank line; a partial last line is skipped with a warning."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines.pop()  # the empty piece after the final newline
    out = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            if number == len(lines) and not complete:
                warnings.append(f"{path}: line {number} is incomplete (a killed run's last write); skipped")
                continue
            rule = f"line {number} is not valid JSON ({type(error).__name__}: {error})"
            raise ConfigError(None, "metrics", str(path), rule, _REPAIR) from None
        if not isinstance(record, dict):
            rule = f"line {number} is {type(record).__name__}, not a JSON object"
            raise ConfigError(None, "metrics", str(path), rule, _REPAIR)
        out.append((number, record))
    return out


_REPAIR = "delete or repair that line (each line is one JSON record of loom train)"


def _append(records: list[dict[str, Any]], record: dict[str, Any], path: Path, number: int) -> None:
    """Add `record` after dropping the earlier records of its kind at or past its step (the resume rule)."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        rule = f"line {number}: a {record['kind']} record without an integer step (step = {step!r})"
        raise ConfigError(None, "metrics", str(path), rule, _REPAIR)
    while records and records[-1]["step"] >= step:
        records.pop()
    records.append(record)
