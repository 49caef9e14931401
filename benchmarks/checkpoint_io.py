"""Checkpoint save and load throughput against the disk's raw bandwidth, and the stall of an async save.

In one run, on the same filesystem (`--dir`):
1. raw write: `--gb` GB in 64 MiB `os.write` chunks, then `os.fsync`; raw read: the same file read back after its
   pages were dropped from the page cache (`posix_fadvise(DONTNEED)`, this file only), so it comes from the disk;
2. save: a state of `--gb` GB of fp32 tensors with `framework.checkpoint.save_checkpoint` (DCP with fsync, meta.json,
   marker, atomic rename); load: `load_checkpoint` into same-shaped tensors (in place, as a resume does) after
   dropping the checkpoint's pages the same way;
3. async stall: the time `torch.distributed.checkpoint.async_save` blocks the caller (staging a CPU copy of the
   state, then writing in a thread) as a fraction of a blocking `dcp.save` of the same state, both with fsync, in a
   one-process gloo group. (torch's API directly: when this was written, no async save of `framework.checkpoint`
   was on main.)

Prints throughputs and the ratios save/raw write, load/raw read (target >= 0.5) and async stall / sync save
(target <= 0.1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_io.py [--gb 1.0] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from framework.checkpoint import load_checkpoint, save_checkpoint

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


@contextmanager
def one_process_group() -> Iterator[None]:
    """A gloo group of this process alone, as async_save's collectives expect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def async_stall(state: dict[str, torch.Tensor], work: Path) -> tuple[float, float, float]:
    """(blocking dcp.save seconds, seconds the first and the second dcp.async_save block the caller). The stager
    keeps its CPU buffers between saves, as a training run's repeated saves would: the first stall also pays for
    allocating (page-faulting) the CPU copy. CPU only: no pinned memory, no CUDA streams."""
    options = StagingOptions(
        use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
    )
    stager = DefaultStager(options)
    with one_process_group():
        sync = timed(
            lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(work / "sync", sync_files=True))
        )
        stalls = []
        for name in ("async1", "async2"):
            writer = dcp.FileSystemWriter(work / name, sync_files=True)
            start = time.perf_counter()
            future = dcp.async_save(state, storage_writer=writer, async_stager=stager)
            stalls.append(time.perf_counter() - start)
            future.result()
    stager.close()
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
        save_s = timed(lambda: save_checkpoint(work / "ckpt", 1, {"model": state}))
        template = {"model": {k: torch.empty_like(v) for k, v in state.items()}}
        drop_cache(work / "ckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_s = timed(lambda: load_checkpoint(work / "ckpt", template=template))
        assert all(torch.equal(template["model"][k], v) for k, v in state.items()), (
            "load returned other values"
        )
        sync_s, first_s, stall_s = async_stall(state, work)
    report(nbytes, size, write_s, read_s, save_s, load_s, sync_s, first_s, stall_s)


def report(nbytes: int, size: int, write_s: float, read_s: float, save_s: float, load_s: float,
           sync_s: float, first_s: float, stall_s: float) -> None:  # fmt: skip
    def gbps(n: int, s: float) -> float:
        return n / s / 1e9

    print(f"raw write (fsync): {gbps(nbytes, write_s):.3f} GB/s  ({nbytes / 1e9:.2f} GB in {write_s:.2f} s)")
    print(f"raw read (cold):   {gbps(nbytes, read_s):.3f} GB/s  ({read_s:.2f} s)")
    print(f"save_checkpoint:   {gbps(size, save_s):.3f} GB/s  ({size / 1e9:.2f} GB in {save_s:.2f} s)")
    print(f"load_checkpoint:   {gbps(size, load_s):.3f} GB/s  ({load_s:.2f} s)")
    print(
        f"dcp.save (sync):   {sync_s:.2f} s; dcp.async_save blocked the caller {first_s:.2f} s the first time "
        f"(allocating its CPU copy), {stall_s:.2f} s the second (copy into the kept buffers)"
    )
    print(f"ratio save / raw write: {gbps(size, save_s) / gbps(nbytes, write_s):.2f}  (target >= 0.5)")
    print(f"ratio load / raw read:  {gbps(size, load_s) / gbps(nbytes, read_s):.2f}  (target >= 0.5)")
    print(
        f"ratio async stall / sync save: {stall_s / sync_s:.3f} (first save {first_s / sync_s:.3f})  (target <= 0.1)"
    )


if __name__ == "__main__":
    main()
