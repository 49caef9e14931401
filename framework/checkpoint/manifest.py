"""File hashes of a checkpoint, computed while its files are written, recorded at commit, checked on read.

Every rank's DCP writer goes through `HashingFileSystem`, whose streams feed each byte DCP writes into a sha256 as it
passes (no second read of multi-GB shards). When the rank's write finishes, it records its files'
{name: {bytes, sha256}} in `hashes_XXXXX.json` inside the temp directory. At commit rank 0 merges those records,
hashes the small files directly (meta.json, rank_*.json, DCP's `.metadata`, an engine's own files), writes
`MANIFEST.json` and puts the manifest's own sha256 into COMPLETE, so neither can change unnoticed.

`manifest_problems` checks a committed directory against its manifest: sizes always (cheap), sha256 when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from framework.outputs import OWNER_MARK

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def rank_hashes_file(rank: int) -> str:
    """Name of the hash record one rank leaves in the temp directory (merged into MANIFEST.json at commit)."""
    return f"hashes_{rank:05d}.json"


class _Hasher:
    """sha256 of a byte stream whose large pieces are hashed in a thread of its own while the same bytes are
    written (hashlib and file writes release the GIL), so a save pays max(write, hash) for them instead of the
    sum. torch.save hands over views of memory it may free once write returns, and copying them costs as much as
    hashing (measured on our machines), so each piece is hashed in place and waited for before write returns."""

    _LARGE = 1 << 20

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._work: queue.Queue[memoryview | None] = queue.Queue()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._digest: str | None = None

    def _run(self) -> None:
        while (view := self._work.get()) is not None:
            self._sha.update(view)
            self._done.set()

    @contextlib.contextmanager
    def hashing(self, view: memoryview) -> Iterator[None]:
        """Hash `view` (in the thread when large) while the block runs; returns when both are done."""
        if len(view) < self._LARGE:
            yield
            self._sha.update(view)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loom-checkpoint-hash", daemon=True)
            self._thread.start()
        self._done.clear()
        self._work.put(view)
        try:
            yield
        finally:
            self._done.wait()  # the caller's buffer must outlive the hash of it

    def finish(self) -> str:
        """The hex digest of everything hashed (stops the thread; the same on every later call)."""
        if self._digest is None:
            if self._thread is not None:
                self._work.put(None)
                self._thread.join()
            self._digest = self._sha.hexdigest()
        return self._digest


class _HashingStream(io.RawIOBase):
    """A write stream that hashes what it writes. DCP writes sequentially (torch.save into a non-seekable
    wrapper); a seek would make the running hash wrong, so it is refused rather than silently mis-hashed."""

    def __init__(self, raw: Any, fs: HashingFileSystem) -> None:
        super().__init__()
        self.raw, self.fs = raw, fs
        self.hasher, self.size = _Hasher(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        with self.hasher.hashing(view):
            try:
                written = self.raw.write(view)
            except OSError as error:
                self.fs.note_error(error)  # torch.save may turn it into "unexpected pos": keep the real cause
                raise
        written = len(view) if written is None else written
        if written != len(view):  # a buffered binary file writes everything or raises; never hash a part
            raise OSError(f"short write to a checkpoint file: {written} of {len(view)} bytes")
        self.size += written
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("checkpoint streams are written sequentially (hashed while written)")

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as error:
            self.fs.note_error(error)
            raise

    def close(self) -> None:
        if not self.closed:
            self.flush()
        self.hasher.finish()
        super().close()


class HashingFileSystem(FileSystem):
    """DCP's local file system, whose write streams record each file's size and sha256 (thread-safe: DCP may
    write several files from several threads)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.error: OSError | None = None
        self._lock = threading.Lock()

    def note_error(self, error: OSError) -> None:
        with self._lock:
            self.error = self.error or error

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        try:
            with path.open(mode) as raw:
                stream = _HashingStream(raw, self)
                yield stream
                stream.close()
        except OSError as error:  # e.g. ENOSPC when the buffered file flushes at close
            self.note_error(error)
            raise
        with self._lock:
            self.records[path.name] = {"bytes": stream.size, "sha256": stream.hasher.finish()}


class HashingWriter(dcp.FileSystemWriter):
    """DCP's file writer through `HashingFileSystem`; after this rank's files are written it leaves their hashes
    in the directory for the commit. `before_write`: called first (the test/drill delay of writer.py)."""

    def __init__(self, path: Path, rank: int, before_write: Any = None) -> None:
        super().__init__(path, sync_files=True)
        self.fs = HashingFileSystem()
        self.hash_rank = rank
        self.before_write = before_write

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.before_write is not None:
            self.before_write()
        future = super().write_data(plan, planner)
        future.wait()  # the file writer finishes before returning; this re-raises its failure
        data_files = {k: v for k, v in self.fs.records.items() if k.endswith(".distcp")}
        _write_json_synced(Path(self.path) / rank_hashes_file(self.hash_rank), data_files)
        return future


def file_record(path: Path) -> dict[str, Any]:
    """{bytes, sha256} of one file, read in 1 MiB chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def write_manifest(tmp: Path, *, skip: frozenset[str]) -> str:
    """Merge the ranks' hash records, hash every other file under `tmp` (but `skip` and Loom's owner marker),
    write MANIFEST.json (fsynced); returns its sha256 (for COMPLETE). The ranks' records are then deleted."""
    from framework.outputs import read_json_file

    recorded: dict[str, dict[str, Any]] = {}
    rank_records = sorted(tmp.glob("hashes_*.json"))
    for record in rank_records:
        recorded.update(read_json_file(record, "checkpoint hash record"))
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        name = file.relative_to(tmp).as_posix()
        if name in skip or name == OWNER_MARK or file in rank_records:
            continue
        files[name] = recorded.get(name) or file_record(file)
        if files[name]["bytes"] != file.stat().st_size:  # written, then changed before the commit
            files[name] = file_record(file)
    body = json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1, sort_keys=True) + "\n"
    _write_text_synced(tmp / MANIFEST, body)
    for record in rank_records:
        record.unlink()
    return hashlib.sha256(body.encode()).hexdigest()


_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


def manifest_problems(path: Path, complete: dict[str, Any], *, hashes: bool) -> list[str] | None:
    """One sentence per file of the committed `path` that differs from its manifest (size always, sha256 when
    `hashes`); None when the checkpoint has no manifest (written before file hashes were recorded)."""
    expected = complete.get("manifest_sha256")
    manifest = path / MANIFEST
    if expected is None and not manifest.is_file():
        return None
    if not manifest.is_file():
        return [f"{MANIFEST} (the file hashes recorded at commit) is missing"]
    if expected is not None and file_record(manifest)["sha256"] != expected:
        return [f"{MANIFEST} does not match the hash COMPLETE recorded for it (edited after the commit)"]
    try:
        files = json.loads(manifest.read_bytes().decode("utf-8"))["files"]
        items = [(str(name), int(rec["bytes"]), str(rec["sha256"])) for name, rec in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{MANIFEST} is malformed ({type(error).__name__})"]
    # Files in parallel threads (hashlib and file reads release the GIL): a multi-rank checkpoint's shard files
    # are hashed at the disk's pace, not one core's.
    with ThreadPoolExecutor(max_workers=min(len(items), _HASH_THREADS) or 1) as pool:
        found = pool.map(lambda item: _file_problem(path, *item, hashes=hashes), items)
        return [problem for problem in found if problem]


def _file_problem(root: Path, name: str, size: int, sha256: str, *, hashes: bool) -> str | None:
    file = root / name
    if not file.is_file():
        return f"{name} is missing (listed in {MANIFEST})"
    actual = file.stat().st_size
    if actual != size:
        return f"{name} has {actual} bytes, {size} when it was written (truncated or changed)"
    if hashes and file_record(file)["sha256"] != sha256:
        return f"{name} does not match the sha256 recorded when it was written (its bytes changed)"
    return None


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json_synced(path: Path, value: Any) -> None:
    _write_text_synced(path, json.dumps(value) + "\n")
