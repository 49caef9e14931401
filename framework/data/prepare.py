"""`loom data prepare`: raw text/JSONL -> tokenized, packed webdataset shards with an index and a manifest.

Pipeline: the main process reads documents in input order and cuts them into ~1 MB chunks; worker processes
tokenize chunks (each appends eos to every document and splits train/validation by a hash of the text); the main
process takes results back *in submission order*, packs each split into samples of seq_len + 1 tokens and writes
shards (framework.data.shards). The output therefore depends on the inputs and settings only, never on the number
of workers. Everything is written into a temporary sibling of the output folder (marked as Loom's) that is
renamed into place when complete: a run that stops early leaves the output as it was, and its temporary folder is
deleted (by the run itself, or by the next run when the process was killed). Nothing in the output folder is ever
deleted file by file (framework.outputs: the one write rule).
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import signal
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from framework.config.errors import ConfigError
from framework.data.documents import SPLITS, expand_inputs, is_validation, iter_documents
from framework.data.shards import (
    DTYPES,
    FORMAT,
    MANIFEST,
    VERSION,
    file_record,
    read_manifest,
    shard_name,
    token_dtype,
    write_shard,
)
from framework.data.tokenizer import Tokenizer, encoder_from_state
from framework.outputs import OWNER_MARK, atomic_dir, check_output, remove_if_owned

PREPARE_KIND = "data-prepare"

CHUNK_BYTES = 1 << 20
DEFAULT_SHARD_SAMPLES = 8192

# Per worker process: the sentencepiece model and what _encode_chunk needs besides the texts.
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: tuple[str, Any], eos_id: int, dtype: str, val_fraction: float) -> None:
    # A forked worker inherits the parent's signal handlers (a trainer's preemption handler, in a test or a
    # notebook); Pool.terminate() relies on SIGTERM's default action, which no Python handler may replace.
    # Ctrl-C reaches the whole process group: the parent handles it and terminates the pool.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if multiprocessing.parent_process() is not None:
        # the pool is the parallelism: the `tokenizers` library's own thread pool per worker would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(encoder=encoder_from_state(tokenizer), eos=eos_id, dtype=DTYPES[dtype])
    _WORKER["val_fraction"] = val_fraction


def _encode_chunk(texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (tokens of its documents, each followed by eos; document lengths including the eos)."""
    ids = _WORKER["encoder"].encode_batch(texts)
    held_out = [is_validation(text, _WORKER["val_fraction"]) for text in texts]
    out = {}
    for split, wanted in zip(SPLITS, (False, True)):
        docs = [doc for doc, val in zip(ids, held_out) if val == wanted]
        lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.int64)
        tokens = np.full(int(lengths.sum()), _WORKER["eos"], dtype=_WORKER["dtype"])
        ends = np.cumsum(lengths)
        for doc, end in zip(docs, ends):
            tokens[end - 1 - len(doc) : end - 1] = doc
        out[split] = (tokens, lengths)
    return out


class Packer:
    """Packs one split's token stream into samples and writes a shard whenever `shard_samples` are ready."""

    def __init__(self, out: Path, split: str, seq_len: int, shard_samples: int, pad_id: int) -> None:
        self.out, self.split, self.seq_len, self.pad_id = out, split, seq_len, pad_id
        self.shard_samples = shard_samples
        self.tokens: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []  # True where a document begins, aligned with tokens
        self.pending = 0
        self.shards: list[dict[str, Any]] = []
        self.stats = {"documents": 0, "tokens": 0, "samples": 0, "padding": 0}

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (already eos-terminated) and write every shard that is full."""
        flags = np.zeros(len(tokens), dtype=bool)
        flags[np.cumsum(lengths) - lengths] = True
        self.tokens.append(tokens)
        self.starts.append(flags)
        self.pending += len(tokens)
        self.stats["documents"] += len(lengths)
        self.stats["tokens"] += len(tokens)
        while self.pending >= self.shard_samples * self.seq_len + 1:
            self._emit(self.shard_samples)

    def finish(self) -> dict[str, Any]:
        """Pad and write what is left (every token belongs to some sample); return the split's record."""
        if self.pending:
            samples = -(-self.pending // self.seq_len)
            padding = samples * self.seq_len + 1 - self.pending
            self.tokens.append(np.full(padding, self.pad_id, dtype=self.tokens[0].dtype))
            # The padding is a document of its own, so document masking keeps real tokens away from it.
            self.starts.append(np.arange(padding) == 0)
            self.pending += padding
            self.stats["padding"] = padding
            self._emit(samples)
        return {**self.stats, "shards": self.shards}

    def _emit(self, samples: int) -> None:
        tokens, starts = np.concatenate(self.tokens), np.concatenate(self.starts)
        end = samples * self.seq_len
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: end + 1], self.seq_len + 1)[
            :: self.seq_len
        ]
        flag_windows = np.lib.stride_tricks.sliding_window_view(starts[: end + 1], self.seq_len + 1)
        doc_starts = [(np.flatnonzero(f[1:]) + 1).astype("<i4") for f in flag_windows[:: self.seq_len]]
        name = shard_name(self.split, len(self.shards))
        self.shards.append(write_shard(self.out, name, self.stats["samples"], windows, doc_starts))
        self.stats["samples"] += samples
        # The last token of this shard's last sample is also the first of the next shard's first sample.
        self.tokens, self.starts = [tokens[end:]], [starts[end:]]
        self.pending = len(tokens) - end


def _chunks(paths: Sequence[Path], text_field: str) -> Iterator[tuple[list[str], int]]:
    """(texts of about CHUNK_BYTES, input bytes read so far)."""
    texts: list[str] = []
    size = 0
    for doc, position in iter_documents(paths, text_field):
        texts.append(doc.text)
        size += len(doc.text)
        if size >= CHUNK_BYTES:
            yield texts, position
            texts, size = [], 0
    if texts:
        yield texts, sum(p.stat().st_size for p in paths)


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer_path: str | Path,
    seq_len: int,
    *,
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_samples: int = DEFAULT_SHARD_SAMPLES,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare `inputs` into the folder `out_dir` and return the manifest.

    The dataset is written into a temporary sibling and renamed into place (framework.outputs), so `out_dir`
    only ever holds a finished preparation, and nothing in it is deleted file by file. A finished preparation
    with identical params there is a no-op; any other non-empty `out_dir` is refused unless `overwrite`, which
    replaces it whole. An `out_dir` that is, holds or lies inside an input (or the tokenizer) is always refused.
    """
    paths = expand_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_path, key="--tokenizer")
    if tokenizer.eos_id < 0:  # every document is stored followed by eos: the boundary the readers rely on
        raise ConfigError(
            None, "--tokenizer", str(tokenizer_path), "defines no eos token, which ends every prepared document",
            "name one in its tokenizer_config.json (eos_token)",
        )  # fmt: skip
    # overwrite=True here: only the refusals nothing lifts (an input; a file where a folder goes).
    out = check_output(out_dir, inputs=[*inputs, *paths, tokenizer.path], overwrite=True, key="--out")
    params = prepare_params(paths, tokenizer, seq_len, text_field, val_fraction, shard_samples)
    done = finished(out, params)
    if done is not None:
        return done
    if not overwrite:
        _refuse_other_preparation(out, params)
        check_output(out, overwrite=False, key="--out")
    remove_stale_temps(out, PREPARE_KIND)
    with atomic_dir(out, PREPARE_KIND, overwrite=overwrite) as tmp:
        manifest = write_prepared(tmp, paths, tokenizer, params, workers, progress)
    return manifest


def prepare_params(
    paths: Sequence[Path],
    tokenizer: Tokenizer,
    seq_len: int,
    text_field: str,
    val_fraction: float,
    shard_samples: int,
    names: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """What a preparation depends on (the manifest's `params`; equal params give equal bytes). `names` are the
    input paths to record, when they differ from where the files are read (the demo builds in a temp folder)."""
    names = paths if names is None else names
    return {
        "inputs": [{"path": str(name), **file_record(p)} for name, p in zip(names, paths)],
        "tokenizer_sha256": tokenizer.sha256,
        "seq_len": seq_len,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "shard_samples": shard_samples,
    }


def write_prepared(
    out: Path,
    paths: Sequence[Path],
    tokenizer: Tokenizer,
    params: dict[str, Any],
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Tokenize, pack and write the shards and the manifest into the new, empty folder `out` (no checks: the
    caller owns `out`, a temporary folder that becomes the output when this returns)."""
    splits = _run(paths, out, tokenizer, params, workers, progress)
    manifest = _manifest(tokenizer, params, splits)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _refuse_other_preparation(out: Path, params: dict[str, Any]) -> None:
    """A finished preparation with other params: name what differs (a clearer refusal than "not empty")."""
    try:
        old = read_manifest(out, "--out")["params"]
    except (ValueError, KeyError, TypeError):
        return  # not (readably) a preparation: the generic refusal follows
    differ = sorted(k for k in params if not isinstance(old, dict) or old.get(k) != params[k])
    if differ:
        rule = f"holds a finished preparation with other {', '.join(differ)}; refusing to replace it"
    else:
        rule = "holds a preparation with these params whose shards are missing or damaged; refusing to replace it"
    raise ConfigError(
        "command line", "--out", str(out), rule, "pass a new folder, or --overwrite to replace it"
    )


def remove_stale_temps(out: Path, kind: str) -> None:
    """Delete temporary siblings of `out` that an earlier run of `kind` on this host left when it was killed
    (its marker names a process that is gone); a live run's, another host's and any unmarked folder are kept."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.loom-tmp-*"):
        try:
            mark = json.loads((tmp / OWNER_MARK).read_text())
            if mark["host"] != socket.gethostname() or _alive(int(mark["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        remove_if_owned(tmp, kind)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _manifest(tokenizer: Tokenizer, params: dict[str, Any], splits: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "params": params,
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },
        "dtype": token_dtype(tokenizer.vocab_size),
        "seq_len": params["seq_len"],
        "sample_len": params["seq_len"] + 1,
        "splits": splits,
    }


def finished(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished preparation in `out` with these params whose files all have their recorded
    sizes; None otherwise."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out, "out")
    except ValueError:
        return None
    if manifest.get("params") != params:
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for suffix in ("tar", "idx"):
                path = out / f"{shard['name']}.{suffix}"
                if not path.is_file() or path.stat().st_size != shard[suffix]["bytes"]:
                    return None
    return manifest


def _run(
    paths: Sequence[Path],
    out: Path,
    tokenizer: Tokenizer,
    params: dict[str, Any],
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    seq, shard = params["seq_len"], params["shard_samples"]
    # A tokenizer without a pad token (Llama-3's) pads a split's last sample with eos (framework/data/hf_tokenizer.py)
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    packers = {split: Packer(out, split, seq, shard, pad) for split in SPLITS}
    init = (tokenizer.worker_state(), tokenizer.eos_id, token_dtype(tokenizer.vocab_size))
    init += (params["val_fraction"],)
    total = sum(item["bytes"] for item in params["inputs"])
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        for result, position in _encoded(paths, params["text_field"], init, workers):
            for split, (tokens, lengths) in result.items():
                packers[split].add(tokens, lengths)
            bar.update(position - bar.n)
            bar.set_postfix(tokens=sum(p.stats["tokens"] for p in packers.values()))
    return {split: packer.finish() for split, packer in packers.items()}


def _encoded(
    paths: Sequence[Path], text_field: str, init: tuple, workers: int | None
) -> Iterator[tuple[dict[str, Any], int]]:
    """Tokenized chunks in input order; with workers, a bounded window of chunks is in flight at once."""
    if workers is None:
        workers = os.cpu_count() or 1
    if workers == 0:
        _init_worker(*init)
        for texts, position in _chunks(paths, text_field):
            yield _encode_chunk(texts), position
        return
    # fork: workers start instantly and inherit the imported modules; nothing they touch uses threads.
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with context.Pool(workers, _init_worker, init) as pool:
        window: deque = deque()
        for texts, position in _chunks(paths, text_field):
            window.append((pool.apply_async(_encode_chunk, (texts,)), position))
            if len(window) >= 2 * workers:
                result, at = window.popleft()
                yield result.get(), at
        while window:
            result, at = window.popleft()
            yield result.get(), at
