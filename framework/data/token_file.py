"""Packed token files: raw little-endian token ids (`train.bin`) with a JSON sidecar (`train.json`).

Documents are concatenated, each followed by eos. The raw layout lets readers memory-map the file (only the
pages a sample touches are read); the sidecar says how to interpret it and which tokenizer produced it:
    {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": N, "documents": D,
     "vocab_size": V, "eos_id": E, "tokenizer_sha256": "..."}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framework.config.errors import ConfigError

FORMAT = "loom-tokens"
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """The narrowest supported dtype name that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def sidecar_path(path: str | Path) -> Path:
    """`train.bin` -> `train.json`."""
    return Path(path).with_suffix(".json")


def write_token_file(
    path: str | Path,
    documents: Sequence[Sequence[int]],
    *,
    eos_id: int,
    vocab_size: int,
    tokenizer_sha256: str,
) -> dict[str, Any]:
    """Write `documents` (token ids, each gets eos appended) to `path` and its sidecar; return the sidecar."""
    dtype = token_dtype(vocab_size)
    total = sum(len(doc) + 1 for doc in documents)
    tokens = np.empty(total, dtype=DTYPES[dtype])
    at = 0
    for doc in documents:
        tokens[at : at + len(doc)] = doc
        tokens[at + len(doc)] = eos_id
        at += len(doc) + 1
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "tokens": total,
        "documents": len(documents),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tokenizer_sha256,
    }
    _atomic_write(Path(path), tokens.tobytes())
    _atomic_write(sidecar_path(path), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


def _atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename: a crash never leaves a truncated file under the final name.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def read_sidecar(path: str | Path, key: str) -> dict[str, Any]:
    """The checked sidecar of token file `path`; `key` is the recipe key that named the file (for errors)."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise ConfigError(None, key, str(path), "file not found", _fix(key))
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(None, key, str(path), f"its sidecar {side.name} is missing", _fix(key)) from None
    except (OSError, ValueError) as error:
        raise ConfigError(str(side), "sidecar", str(side), f"unreadable JSON ({error})", _fix(key)) from None
    _check_meta(path, side, meta, key)
    return meta


def _check_meta(path: Path, side: Path, meta: Any, key: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(str(side), "format", _get(meta, "format"), f"must be '{FORMAT}'", _fix(key))
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise ConfigError(str(side), "dtype", dtype, f"must be one of {sorted(DTYPES)}", _fix(key))
    tokens = meta.get("tokens")
    expected = tokens * DTYPES[dtype].itemsize if isinstance(tokens, int) else None
    size = path.stat().st_size
    if expected != size:
        raise ConfigError(
            str(side),
            "tokens",
            tokens,
            f"{path.name} has {size} bytes, not tokens x {DTYPES[dtype].itemsize} (truncated or mismatched)",
            _fix(key),
        )


def _get(meta: Any, name: str) -> Any:
    return meta.get(name) if isinstance(meta, dict) else meta


def _fix(key: str) -> str:
    return f"rebuild it with `make data` (tools/build_demo_data.py), or point {key} at a token file"


def open_tokens(path: str | Path, key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-map token file `path` (read-only, nothing loaded up front) and return it with its sidecar."""
    meta = read_sidecar(path, key)
    dtype = DTYPES[meta["dtype"]]
    if meta["tokens"] == 0:
        # mmap cannot map an empty file.
        return np.zeros(0, dtype=dtype), meta
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["tokens"],)), meta
