"""`loom ckpt inspect`: what a checkpoint holds, read from meta.json and DCP's index only (no tensor is loaded).

It also reports what `verify_checkpoint` would refuse (no COMPLETE marker, a missing, truncated or changed file
against the sha256 manifest, a pickled entry) instead of stopping at it, so a broken checkpoint can be looked at too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.manifest import manifest_problems
from framework.checkpoint.verify import (
    byte_entry_problems,
    read_dcp_metadata,
    read_meta_json,
    storage_problems,
)
from framework.config.errors import ConfigError

# the recipe's model fields worth a line in a summary (the rest are in meta.json's recipe)
_MODEL_FIELDS = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "kv_heads",
    "ffn_hidden",
    "max_seq_len",
)


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The report as plain data (what `--json` prints)."""
    from framework.checkpoint.io import MARKER, META

    step_dir = _step_dir(Path(path))
    meta = read_meta_json(step_dir / META)
    metadata = read_dcp_metadata(step_dir)
    tensors = [_tensor_row(key, item) for key, item in sorted(metadata.state_dict_metadata.items())]
    hashed = manifest_problems(step_dir, _complete_record(step_dir / MARKER), hashes=True)
    problems = (hashed or []) + byte_entry_problems(metadata) + storage_problems(step_dir, metadata)
    return {
        "path": str(step_dir),
        "complete": (step_dir / MARKER).is_file(),
        "files_ok": not problems,
        "file_problems": problems,
        "hashes": "not recorded (written by an older Loom)" if hashed is None else "checked",
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "format_version": meta.get("format_version"),
        "layout": meta.get("layout", "unknown"),
        "model": _model_summary(meta, tensors),
        "total_bytes": sum(row["bytes"] for row in tensors),
        "tensors": tensors,
    }


def _complete_record(marker: Path) -> dict[str, Any]:
    """COMPLETE's record, {} when it is missing or unreadable (reported as incomplete / by the manifest check)."""
    try:
        value = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _step_dir(path: Path) -> Path:
    """A step directory as is; a checkpoint root through its `latest` file (complete or not: this only reads)."""
    from framework.checkpoint.io import LATEST

    if not path.is_dir():
        raise ConfigError(
            None, "checkpoint", str(path), "no such checkpoint directory",
            "pass a step_XXXXXXXX directory or a checkpoint root holding a 'latest' file",
        )  # fmt: skip
    latest = path / LATEST
    return path / latest.read_text().strip() if latest.is_file() else path


def _tensor_row(key: str, item: Any) -> dict[str, Any]:
    if not isinstance(item, TensorStorageMetadata):
        return {"key": key, "shape": None, "dtype": "bytes", "chunks": 1, "bytes": 0}
    dtype = item.properties.dtype
    return {
        "key": key,
        "shape": list(item.size),
        "dtype": str(dtype).removeprefix("torch."),
        "chunks": len(item.chunks),
        "bytes": math.prod(item.size) * dtype.itemsize,
    }


def _model_summary(meta: dict[str, Any], tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """Key fields of the recipe's model section (None where absent) and the model's parameter count on disk."""
    recipe = meta.get("recipe")
    model = recipe.get("model") if isinstance(recipe, dict) else None
    summary: dict[str, Any] = {f: model.get(f) for f in _MODEL_FIELDS} if isinstance(model, dict) else {}
    moe = model.get("moe") if isinstance(model, dict) else None
    if isinstance(moe, dict):
        summary["moe_experts"] = moe.get("n_experts")
    model_rows = [row for row in tensors if row["key"].startswith("model/") and row["shape"] is not None]
    summary["parameters"] = sum(math.prod(row["shape"]) for row in model_rows)
    return summary


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of `inspect_checkpoint`'s report."""
    files = "ok" if report["files_ok"] else "; ".join(report["file_problems"])
    model = ", ".join(f"{k} {v}" for k, v in report["model"].items() if v is not None)
    lines = [
        f"checkpoint:     {report['path']}",
        f"complete:       {'yes' if report['complete'] else 'NO (no COMPLETE marker: never loaded)'}",
        f"step:           {report['step']}",
        f"tokens:         {report['tokens']}",
        f"format version: {report['format_version']}",
        f"layout:         {report['layout']}",
        f"model:          {model}",
        f"files:          {files}",
        f"file hashes:    {report['hashes']}",
        f"tensors:        {len(report['tensors'])}, {_human_bytes(report['total_bytes'])}",
        "",
        *_table(report["tensors"]),
    ]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    header = ("key", "global shape", "dtype", "chunks", "bytes")
    cells = [header] + [
        (r["key"], _shape_text(r["shape"]), r["dtype"], str(r["chunks"]), _human_bytes(r["bytes"]))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]  # fmt: skip


def _shape_text(shape: list[int] | None) -> str:
    if shape is None:
        return "-"
    return "x".join(map(str, shape)) if shape else "scalar"


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
