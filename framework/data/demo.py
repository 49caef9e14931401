"""The bundled demo corpus: the docstrings of Python's standard library, built with the user-facing data commands.

Nothing is downloaded: the text comes from the interpreter that runs the build (one docstring = one document,
plus the language-reference topics that `help()` prints), so the same machine always builds the same bytes.
`loom data demo` = collect the docstrings into corpus.jsonl -> `loom data tokenizer` -> `loom data prepare`.

Output directory (default `data/demo/`):
    corpus.jsonl                 the collected documents, one {"text": ...} per line
    tokenizer.model              SentencePiece model (see framework.data.tokenizer for the id layout)
    manifest.json, train-*.tar/.idx, validation-*.tar/.idx
                                 the prepared dataset (framework.data.shards); about `val_fraction` of the
                                 documents are held out, chosen by a hash of the text
    demo.json                    the demo's parameters and the prepared manifest's sha256, so an unchanged
                                 rebuild is a no-op
The folder is built whole in a temporary sibling and renamed into place (framework.outputs). A rebuild replaces an
existing folder only when every file in it is one a demo build writes (or with `overwrite`), so a user's own file
in it is never deleted.
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

from framework.config.errors import ConfigError
from framework.data import stdlib_docs
from framework.data.prepare import prepare_params, remove_stale_temps, write_prepared
from framework.data.shards import MANIFEST, PreparedSplit, read_manifest
from framework.data.tokenizer import DEFAULT_NUM_SENTINELS, train_tokenizer_on_files
from framework.outputs import atomic_dir, check_output

# 4096: the debug recipe's model.vocab_size. The demo's bar, mean loss <= 0.6 * ln(vocab), is relatively easiest
# here: measured with a 4-layer d192 proxy (300 steps x 16 x 128 tokens), the gap to the bar was +0.57 nats at
# 4096 against +0.78 at 2048 and +0.75 at 1024 (smaller vocabularies lower the bar faster than the loss), and
# 8192 is worse still (bigram entropy already above its bar). Common words are single pieces (~4 bytes/token).
DEFAULT_VOCAB_SIZE = 4096
# 5%, not 1%: the whole stdlib yields only ~2 MB of prose, and 1% (~5k tokens) would not fill one evaluation of
# the debug recipe (8 micro-batches x 16 x 128 = 16k tokens). 5% holds ~25k tokens and costs little training data.
DEFAULT_VAL_FRACTION = 0.05
# The debug recipe's data.seq_len; shorter recipes use a divisor of it (framework.data.shards.PreparedSplit).
DEFAULT_SEQ_LEN = 128
STAMP = "demo.json"
CORPUS = "corpus.jsonl"
TOKENIZER = "tokenizer.model"
DEMO_KIND = "data-demo"
FORMAT = "loom-demo-data"
VERSION = 2
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


def build_demo_data(
    out_dir: str | Path = "data/demo",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    model_type: Literal["bpe", "unigram"] = "bpe",
    num_sentinels: int = DEFAULT_NUM_SENTINELS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_threads: int = 2,
    modules: Sequence[str] | None = None,
    shard_samples: int = 8192,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build (or, when an identical finished build is there, just return) the demo data; returns the prepared
    manifest. `modules` restricts the corpus to some stdlib modules (tests use it to build a small corpus).
    An `out_dir` holding files a demo build does not write is refused unless `overwrite` (replaced whole)."""
    out = Path(out_dir)
    params = {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "num_sentinels": num_sentinels,
        "val_fraction": val_fraction,
        "seq_len": seq_len,
        "num_threads": num_threads,
        "modules": sorted(modules) if modules else None,
        "shard_samples": shard_samples,
        # Not the Python version: the corpus it gave is kept in out_dir (CORPUS, its sha256 in the manifest), so
        # a finished build carried to a machine with another Python is used as it is, not rebuilt there.
    }
    existing = finished_demo(out, params)
    if existing is not None:
        return existing
    _check_demo_out(out, overwrite)
    remove_stale_temps(out, DEMO_KIND)
    # Built whole in a temporary sibling, then renamed onto `out`: a stopped build leaves `out` as it was.
    with atomic_dir(out, DEMO_KIND, overwrite=True) as tmp:
        manifest = _build(tmp, out, params)
        stamp = {
            "params": params,
            "manifest_sha256": _sha256(tmp / MANIFEST),
            "built_with_python": sys.version,  # provenance only: not compared
        }
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _check_demo_out(out: Path, overwrite: bool) -> None:
    """`out` may be replaced when it is empty, an earlier demo build (every file in it one a build writes), or
    with `overwrite`; a folder holding anything else is refused, so a rebuild never deletes a user's file."""
    check_output(out, overwrite=True, key="--out")  # a file where the folder goes: refused even so
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    foreign = _foreign_files(out)
    if foreign:
        rule = f"holds {foreign[0]!r}, which `loom data demo` did not write; refusing to replace the folder"
        raise ConfigError("command line", "--out", str(out), rule, "pass a new folder, or --overwrite")


def _foreign_files(out: Path) -> list[str]:
    """Names in `out` that a demo build does not write (all of them when `out` has no demo stamp)."""
    names = sorted(p.name for p in out.iterdir())
    try:
        stamp = json.loads((out / STAMP).read_text(encoding="utf-8"))
        if stamp["params"]["format"] != FORMAT:
            return names
    except (OSError, ValueError, KeyError, TypeError):
        return names
    ours = {STAMP, MANIFEST, CORPUS, TOKENIZER}
    try:
        splits = read_manifest(out, "--out")["splits"].values()
        ours |= {f"{s['name']}.{end}" for split in splits for s in split["shards"] for end in ("tar", "idx")}
    except ValueError:
        pass  # no readable manifest: no shard is known to be ours
    return [n for n in names if n not in ours or not (out / n).is_file() or (out / n).is_symlink()]


def _build(tmp: Path, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Corpus, tokenizer and prepared dataset written into `tmp`, recording the input as `out`'s corpus."""
    corpus = tmp / CORPUS
    with open(corpus, "w", encoding="utf-8") as f:
        for text in collect_documents(params["modules"]):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    # The same two steps as `loom data tokenizer` and `loom data prepare`.
    tokenizer = train_tokenizer_on_files(
        [corpus],
        tmp / TOKENIZER,
        params["vocab_size"],
        val_fraction=params["val_fraction"],
        model_type=params["model_type"],
        num_sentinels=params["num_sentinels"],
        num_threads=params["num_threads"],
    )
    prepared = prepare_params(
        [corpus],
        tokenizer,
        params["seq_len"],
        "text",
        params["val_fraction"],
        params["shard_samples"],
        names=[out / CORPUS],
    )
    return write_prepared(tmp, [corpus], tokenizer, prepared, params["num_threads"], progress=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished_demo(out_dir: str | Path, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The prepared manifest of a finished demo build in `out_dir` whose shards are all intact (and, when given,
    whose parameters equal `params`); None otherwise: missing, half-built, edited or built differently."""
    out = Path(out_dir)
    try:
        stamp = json.loads((out / STAMP).read_text(encoding="utf-8"))
        # "python": written by builds before the stamp stopped keying on the interpreter; ignored
        if params is not None and {k: v for k, v in stamp["params"].items() if k != "python"} != params:
            return None
        if stamp["manifest_sha256"] != _sha256(out / MANIFEST):
            return None
        # the corpus the tokenizer and shards were made from, as the manifest recorded it
        (corpus,) = read_manifest(out, "data/demo")["params"]["inputs"]
        if corpus["sha256"] != _sha256(out / CORPUS):
            return None
        for split in ("train", "validation"):
            dataset = PreparedSplit(out, split, "data/demo", verify="sha256")
        if _sha256(out / TOKENIZER) != dataset.manifest["tokenizer"]["sha256"]:
            return None
        return dataset.manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None
