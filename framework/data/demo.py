"""The bundled demo corpus: the docstrings of Python's standard library, a tokenizer, and packed token files.

Nothing is downloaded: the text comes from the interpreter that runs the build (one docstring = one document,
plus the language-reference topics that `help()` prints), so the same machine always builds the same bytes.

Output directory (default `data/demo/`):
    tokenizer.model              SentencePiece model (see framework.data.tokenizer for the id layout)
    train.bin / train.json       packed training tokens + sidecar (framework.data.token_file)
    val.bin / val.json           held-out documents (about `val_fraction` of them, chosen by a hash of the text)
    manifest.json                written last: its presence means the build finished; it records the parameters
                                 and the sha256 of every file, so an unchanged rebuild is a no-op
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from framework.data import stdlib_docs
from framework.data.token_file import write_token_file
from framework.data.tokenizer import DEFAULT_NUM_SENTINELS, train_tokenizer

# 4096: the debug recipe's model.vocab_size. The demo's bar, mean loss <= 0.6 * ln(vocab), is relatively easiest
# here: measured with a 4-layer d192 proxy (300 steps x 16 x 128 tokens), the gap to the bar was +0.57 nats at
# 4096 against +0.78 at 2048 and +0.75 at 1024 (smaller vocabularies lower the bar faster than the loss), and
# 8192 is worse still (bigram entropy already above its bar). Common words are single pieces (~4 bytes/token).
DEFAULT_VOCAB_SIZE = 4096
# 5%, not 1%: the whole stdlib yields only ~2 MB of prose, and 1% (~5k tokens) would not fill one evaluation of
# the debug recipe (8 micro-batches x 16 x 128 = 16k tokens). 5% holds ~25k tokens and costs little training data.
DEFAULT_VAL_FRACTION = 0.05
MANIFEST = "manifest.json"
FORMAT = "loom-demo-data"
VERSION = 1
COLLECT_TIMEOUT_S = 300


def collect_documents(modules: Sequence[str] | None = None) -> list[str]:
    """Prose docstrings of `modules` (None: the whole standard library plus the help topics), deduplicated and
    in a fixed pseudo-random order (by sha256 of the text), so neighbours in the packed stream are unrelated."""
    texts = _collect_in_child(list(modules or []))
    return sorted((text for text in texts if is_prose(text)), key=_digest)


def _collect_in_child(modules: list[str]) -> list[str]:
    # -S -s: no site-packages and no .pth hooks (only the stdlib is visible); -P: the script's folder is not on
    # sys.path, so a file next to it cannot shadow a stdlib module. A fixed hash seed removes the last source of
    # run-to-run variation; PYTHON* variables of the caller (PYTHONPATH, PYTHONSTARTUP) are dropped.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docs.json"
        command = [sys.executable, "-S", "-s", "-P", stdlib_docs.__file__, str(out), *modules]
        result = subprocess.run(
            command,
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=COLLECT_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"collecting stdlib docstrings failed (exit {result.returncode}):\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))


def is_prose(text: str) -> bool:
    """English prose, not a stub ('-self'), a doctest dump or a table of escapes: at least 4 words, mostly letters
    and spaces, and (almost) all ASCII."""
    if len(text.split()) < 4:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    ascii_chars = sum(c.isascii() for c in text)
    return letters >= 0.6 * len(text) and ascii_chars >= 0.95 * len(text)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_documents(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): a document is held out when the first 8 bytes of its sha256 fall in the lowest
    `val_fraction` of the range, so the split depends on the text only, not on order or on the other documents."""
    limit = int(val_fraction * 2**64)
    train, val = [], []
    for doc in documents:
        (val if int.from_bytes(_digest(doc)[:8], "big") < limit else train).append(doc)
    return train, val


def build_demo_data(
    out_dir: str | Path = "data/demo",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    model_type: Literal["bpe", "unigram"] = "bpe",
    num_sentinels: int = DEFAULT_NUM_SENTINELS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    num_threads: int = 2,
    modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build (or, when an identical finished build is there, just return) the demo data; returns the manifest.

    `modules` restricts the corpus to some stdlib modules (tests use it to build a small corpus quickly).
    """
    out = Path(out_dir)
    params = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "num_sentinels": num_sentinels,
        "val_fraction": val_fraction,
        "num_threads": num_threads,
        "modules": sorted(modules) if modules else None,
        # The corpus is this interpreter's stdlib: another Python version is another corpus.
        "python": sys.version,
    }
    existing = finished_manifest(out, params)
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    manifest = _build(out, params)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST)
    return manifest


def _build(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    documents = collect_documents(params["modules"])
    train_docs, val_docs = split_documents(documents, params["val_fraction"])
    tokenizer = train_tokenizer(
        train_docs,
        out / "tokenizer.model",
        params["vocab_size"],
        model_type=params["model_type"],
        num_sentinels=params["num_sentinels"],
        num_threads=params["num_threads"],
    )
    splits = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids = tokenizer.encode_batch(docs, num_threads=params["num_threads"])
        splits[name] = write_token_file(
            out / f"{name}.bin",
            ids,
            eos_id=tokenizer.eos_id,
            vocab_size=tokenizer.vocab_size,
            tokenizer_sha256=tokenizer.sha256,
        )
    names = ("tokenizer.model", "train.bin", "train.json", "val.bin", "val.json")
    return {
        "format": FORMAT,
        "version": VERSION,
        "params": params,
        "text_bytes": sum(len(doc.encode("utf-8")) for doc in documents),
        "documents": {name: meta["documents"] for name, meta in splits.items()},
        "tokens": {name: meta["tokens"] for name, meta in splits.items()},
        "files": {name: _file_record(out / name) for name in names},
    }


def _file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def finished_manifest(out_dir: str | Path, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of a finished build in `out_dir` whose files are all intact (and, when given, whose
    parameters equal `params`); None otherwise: missing, half-built, edited or built differently."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if params is not None and manifest["params"] != params:
            return None
        intact = all(
            (out / name).is_file() and _file_record(out / name) == rec for name, rec in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if intact else None
