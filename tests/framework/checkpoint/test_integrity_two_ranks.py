"""Two ranks (gloo, forked processes) save one checkpoint, sync then async: each rank hashes its own shard file while
writing it, rank 0 merges both ranks' records into the manifest at commit, and verify checks every byte."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import framework.checkpoint.manifest as manifest_mod
from framework.checkpoint.manifest import MANIFEST, file_record
from framework.checkpoint.rng import get_rng_state
from framework.checkpoint.verify import verify_checkpoint
from framework.checkpoint.writer import CheckpointWriter


def _save_on_rank(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    original = manifest_mod.file_record

    def no_second_read(path: Path) -> dict:
        assert not path.name.endswith(".distcp"), f"{path.name} read back to be hashed"
        return original(path)

    manifest_mod.file_record = no_second_read  # a forked child: nothing to restore
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rng = {"rng": get_rng_state(torch.device("cpu"))}
        for step, async_save in ((1, False), (2, True)):
            writer = CheckpointWriter(root, rank=rank, distributed=True, async_save=async_save)
            state = {
                "model": {f"rank{rank}": torch.full((1000,), float(rank + step)), "shared": torch.ones(8)}
            }
            writer.save(step, state, {"tokens": step}, rng)
            writer.close()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_hash_their_own_files_and_rank0_merges_them(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # no pickling of this module's functions (importlib mode)
    port = _free_port()
    procs = [context.Process(target=_save_on_rank, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    if any(p.is_alive() for p in procs):
        for p in procs:
            p.kill()
        pytest.fail("the two-rank save hung")
    assert [p.exitcode for p in procs] == [0, 0]
    for step in ("step_00000001", "step_00000002"):
        path = tmp_path / step
        files = json.loads((path / MANIFEST).read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", "rank_00000.json", "rank_00001.json", "meta.json"} <= set(
            files
        )
        assert all(files[n] == file_record(path / n) for n in files) and not list(path.glob("hashes_*"))
        assert verify_checkpoint(path)["hashes"] == "checked"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
