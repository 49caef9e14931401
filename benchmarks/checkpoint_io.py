"""Checkpoint save and load throughput against the disk's raw bandwidth, and the stall of an async save.

In one run, on the same filesystem (`--dir`):
1. raw write: `--gb` GB in 64 MiB `os.write` chunks, then `os.fsync`; raw read: the same file read back after its
   pages were dropped from the page cache (`posix_fadvise(DONTNEED)`, this file only), so it comes from the disk;
2. save: a state of `--gb` GB of fp32 tensors with `framework.checkpoint.save_checkpoint` (DCP with fsync, meta.json,
   marker, atomic rename); load: `load_checkpoint` into same-shaped tensors (in place, as a resume does) after
   dropping the checkpoint's pages the same way;
3. hashing: a plain DCP save (torch's own FileSystemWriter, no hashes) of the same state, against save_checkpoint,
   whose writer hashes every byte as it writes it (MANIFEST.json); and `verify_checkpoint(hashes=True)` of the
   checkpoint from a cold cache (what `--resume auto`, consolidate and convert pay before reading) against raw read;
4. async stall: the time an async save (framework.checkpoint.writer.CheckpointWriter, checkpoint.async_save) blocks
   training (copying the state into its kept staging buffers; the writing, fsync and commit happen in a thread)
   as a fraction of a sync save of the same state.

Prints throughputs and the ratios save/raw write, load/raw read (target >= 0.5), hashed save / plain DCP save
(target >= 0.8: hashing while writing costs at most a fifth), verify / raw read (target >= 0.5) and async stall /
sync save (target <= 0.1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_io.py [--gb 1.0] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from framework.checkpoint import load_checkpoint, save_checkpoint
from framework.checkpoint.verify import verify_checkpoint
from framework.checkpoint.writer import CheckpointWriter

CHUNK = 64 * 2**20
TENSORS = 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the raw file and of the state (10^9 bytes)")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    return p.parse_args()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_cache(root: Path) -> None:
    """Evict these files' pages (only theirs: the machine is shared), so the next read comes from the disk."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, nbytes: int) -> float:
    block = os.urandom(CHUNK)  # incompressible, in case the storage compresses
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for offset in range(0, nbytes, CHUNK):
            os.write(fd, block[: min(CHUNK, nbytes - offset)])
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def raw_read(path: Path) -> float:
    drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - start


def make_state(nbytes: int) -> dict[str, torch.Tensor]:
    numel = nbytes // 4 // TENSORS
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(numel, generator=g) for i in range(TENSORS)}


def async_stall(state: dict[str, torch.Tensor], work: Path) -> tuple[float, float, float]:
    """(sync save seconds, seconds the first and the second async save block training), all through
    framework.checkpoint.writer.CheckpointWriter as `loom train` uses it (checkpoint.async_save): the async writer
    copies the state into staging buffers it keeps (the first save also allocates them), then writes, fsyncs and
    commits in a background thread."""
    meta = {"recipe": {}}
    sync = CheckpointWriter(work / "sync").save(1, {"model": state}, meta, {})
    writer = CheckpointWriter(work / "async", async_save=True)
    stalls = []
    for step in (1, 2):
        stalls.append(writer.save(step, {"model": state}, meta, {}))  # waits for the previous save first
    writer.close()
    return sync, stalls[0], stalls[1]


def main() -> None:
    args = parse()
    nbytes = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".checkpoint_io-") as tmp:
        work = Path(tmp)
        write_s = raw_write(work / "raw.bin", nbytes)
        read_s = raw_read(work / "raw.bin")
        (work / "raw.bin").unlink()
        state = make_state(nbytes)
        size = sum(t.numel() * t.element_size() for t in state.values())
        # plain and hashed saves alternate (plain, hashed, plain, hashed; the best of each): page cache and disk
        # state then favour neither
        plain, hashed = [], []
        for i in range(2):
            plain.append(timed(lambda i=i: plain_save(work / f"plain{i}", state)))
            hashed.append(timed(lambda i=i: save_checkpoint(work / f"ckpt{i}", 1, {"model": state})))
            shutil.rmtree(work / f"plain{i}")
        plain_s, save_s = min(plain), min(hashed)
        shutil.rmtree(work / "ckpt1")
        os.replace(work / "ckpt0", work / "ckpt")
        template = {"model": {k: torch.empty_like(v) for k, v in state.items()}}
        drop_cache(work / "ckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_s = timed(lambda: load_checkpoint(work / "ckpt", template=template))
        assert all(torch.equal(template["model"][k], v) for k, v in state.items()), (
            "load returned other values"
        )
        drop_cache(work / "ckpt")
        verify_s = timed(lambda: verify_checkpoint(work / "ckpt" / "step_00000001", hashes=True))
        sync_s, first_s, stall_s = async_stall(state, work)
    report(nbytes, size, write_s, read_s, save_s, load_s, sync_s, first_s, stall_s)
    print(
        f"plain DCP save:    {size / plain_s / 1e9:.3f} GB/s; verify (sha256, cold): {size / verify_s / 1e9:.3f} GB/s"
    )
    print(f"ratio hashed save / plain DCP save: {plain_s / save_s:.2f}  (target >= 0.8)")
    print(f"ratio verify / raw read: {read_s / verify_s:.2f}  (target >= 0.5)")


def plain_save(path: Path, state: dict[str, torch.Tensor]) -> None:
    """torch's own DCP save with fsync and no hashing: what save_checkpoint cost before MANIFEST.json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(path, sync_files=True), no_dist=True)


def report(nbytes: int, size: int, write_s: float, read_s: float, save_s: float, load_s: float,
           sync_s: float, first_s: float, stall_s: float) -> None:  # fmt: skip
    def gbps(n: int, s: float) -> float:
        return n / s / 1e9

    print(f"raw write (fsync): {gbps(nbytes, write_s):.3f} GB/s  ({nbytes / 1e9:.2f} GB in {write_s:.2f} s)")
    print(f"raw read (cold):   {gbps(nbytes, read_s):.3f} GB/s  ({read_s:.2f} s)")
    print(f"save_checkpoint:   {gbps(size, save_s):.3f} GB/s  ({size / 1e9:.2f} GB in {save_s:.2f} s)")
    print(f"load_checkpoint:   {gbps(size, load_s):.3f} GB/s  ({load_s:.2f} s)")
    print(
        f"sync save:         {sync_s:.2f} s; an async save blocked training {first_s:.2f} s the first time "
        f"(allocating its staging copy), {stall_s:.2f} s the second (copy into the kept buffers)"
    )
    print(f"ratio save / raw write: {gbps(size, save_s) / gbps(nbytes, write_s):.2f}  (target >= 0.5)")
    print(f"ratio load / raw read:  {gbps(size, load_s) / gbps(nbytes, read_s):.2f}  (target >= 0.5)")
    print(
        f"ratio async stall / sync save: {stall_s / sync_s:.3f} (first save {first_s / sync_s:.3f})  (target <= 0.1)"
    )


if __name__ == "__main__":
    main()
