"""Checkpoint integrity: sha256 of every file recorded at commit (hashed while written), checked by verify; meta.json
cross-checked against the checkpoint's own data; damaged files as one-line ConfigErrors; a full disk as one line
that says so and leaves no partial directory."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import framework.checkpoint.manifest as manifest_mod
from framework.checkpoint import load_checkpoint, save_checkpoint
from framework.checkpoint.manifest import MANIFEST, file_record
from framework.checkpoint.rng import get_rng_state
from framework.checkpoint.verify import read_dcp_metadata, verify_checkpoint
from framework.checkpoint.writer import CheckpointWriter
from framework.config import ConfigError


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # model/a first and large: the later chunks start past 64 KiB (what the pickle-in-a-chunk case needs)
    return {"model": {"a": torch.randn(40000, generator=g), "w": torch.randn(32, 32, generator=g)}}


def _save(root: Path, step: int = 7) -> Path:
    return save_checkpoint(root, step, _state(step), {"tokens": 5})


def _as_old(path: Path) -> Path:
    """The checkpoint as a Loom without file hashes wrote it: no manifest, COMPLETE with the step only."""
    (path / MANIFEST).unlink()
    (path / "COMPLETE").write_text(json.dumps({"step": int(path.name.removeprefix("step_"))}))
    return path


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_record(p)["sha256"] for p in root.rglob("*") if p.is_file()}


def refused(path: Path, *expected: str, hashes: bool = True) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            verify_checkpoint(path, hashes=hashes)
    message = str(info.value)
    assert "\n" not in message and all(e in message for e in expected), message
    return message


def test_manifest_hashes_every_file_while_it_is_written(tmp_path: Path, monkeypatch) -> None:
    read_back = []
    original = manifest_mod.file_record
    monkeypatch.setattr(manifest_mod, "file_record", lambda p: read_back.append(p.name) or original(p))
    path = _save(tmp_path)
    assert not any(name.endswith(".distcp") for name in read_back), read_back  # shards: no second read
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "meta.json"]
    for name, record in files.items():
        assert record == original(path / name), name
    complete = json.loads((path / "COMPLETE").read_text())
    assert complete == {"step": 7, "manifest_sha256": original(path / MANIFEST)["sha256"]}
    assert verify_checkpoint(path)["hashes"] == "checked"


@pytest.mark.parametrize("async_save", [False, True])
def test_writer_manifest_covers_rank_files_sync_and_async(tmp_path: Path, async_save: bool) -> None:
    writer = CheckpointWriter(tmp_path, async_save=async_save)
    for step in (1, 2):
        writer.save(step, _state(step), {"tokens": step}, {"rng": get_rng_state(torch.device("cpu"))})
    writer.close()
    path = tmp_path / "step_00000002"
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "meta.json", "rank_00000.json"]
    assert all(files[n] == file_record(path / n) for n in files)
    assert not list(path.glob("hashes_*.json")) and verify_checkpoint(path)["hashes"] == "checked"


@pytest.mark.parametrize(
    "where",
    ["middle", "first bytes", "last byte"],
)
def test_changed_shard_bytes_fail_the_hash_and_name_the_file(tmp_path: Path, where: str) -> None:
    path = _save(tmp_path)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    span = {"middle": slice(len(data) // 2, len(data) // 2 + 4096), "first bytes": slice(0, 8)}.get(
        where, slice(len(data) - 1, len(data))
    )
    data[span] = bytes(b ^ 0xFF for b in data[span])
    shard.write_bytes(data)  # same size: only the hash can tell
    refused(path, "__0_0.distcp does not match the sha256 recorded when it was written")
    assert verify_checkpoint(path, hashes=False)["hashes"] == "sizes only"  # the cheap mode checks sizes only


def test_edited_meta_step_is_caught_by_hash_then_by_the_checkpoint_itself(tmp_path: Path) -> None:
    path = _save(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"step": 1000}))
    refused(path, "meta.json has", "when it was written")
    _as_old(path)  # no hashes: COMPLETE, the directory name and the step tensor still disagree with it
    refused(path, "its meta.json says step 1000, COMPLETE says 7")
    (path / "COMPLETE").write_text(json.dumps({"step": 1000}))
    refused(path, "its meta.json says step 1000, the directory name says 7")
    moved = path.rename(path.with_name("step_00001000"))
    refused(moved, "its meta.json says step 1000, the saved step tensor says 7")


def test_an_edited_manifest_is_caught_by_complete(tmp_path: Path) -> None:
    path = _save(tmp_path)
    record = json.loads((path / MANIFEST).read_text())
    record["files"]["meta.json"]["sha256"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(record))
    refused(path, "MANIFEST.json does not match the hash COMPLETE recorded for it")


def test_an_old_checkpoint_loads_with_a_warning(tmp_path: Path) -> None:
    path = _as_old(_save(tmp_path))
    with pytest.warns(UserWarning, match="no recorded file hashes .* contents cannot be verified"):
        assert verify_checkpoint(path)["hashes"] == "not recorded"
    assert torch.equal(load_checkpoint(path).state["model"]["w"], _state(7)["model"]["w"])


def _writer_checkpoint(root: Path) -> Path:
    CheckpointWriter(root).save(3, _state(3), {"tokens": 3}, {"rng": get_rng_state(torch.device("cpu"))})
    return root / "step_00000003"


RANK, META = "rank_00000.json", "meta.json"


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        (RANK, lambda p: (p / RANK).write_text("}{ garbage"), (RANK, "not valid JSON")),
        (RANK, lambda p: (p / RANK).write_text('{"rng": {"torch": [1, 2]}}'), (RANK, "not a rank state")),
        (RANK, lambda p: (p / RANK).write_text("[1, 2]"), (RANK, "not an object")),
        (META, lambda p: _edit_meta(p, lambda m: m.pop("state")), ("meta.json has no 'state' dict",)),
        (META, lambda p: _edit_meta(p, lambda m: m.update(step="3")), ("meta.json has no 'step' int",)),
        (
            META,
            lambda p: (p / META).write_bytes(b'{"step": 3, "state": {}, "x": "\xff"}'),
            ("UnicodeDecode",),
        ),
        ("COMPLETE", lambda p: (p / "COMPLETE").write_text("nonsense"), ("COMPLETE", "not valid JSON")),
    ],
    ids=[
        "rank-garbage",
        "rank-bad-rng",
        "rank-list",
        "meta-no-state",
        "meta-step-str",
        "meta-not-utf8",
        "complete",
    ],
)
def test_damaged_json_files_are_one_line_errors(tmp_path: Path, name: str, damage, expected) -> None:
    path = _writer_checkpoint(tmp_path / "hashed")
    old = _as_old(Path(shutil.copytree(path, tmp_path / "old" / path.name)))
    damage(path)
    # with hashes the manifest catches the change first (COMPLETE is what holds the manifest's own hash)
    refused(path, *(expected if name == "COMPLETE" else (name, "when it was written")))
    damage(old)
    refused(old, *expected)  # without: the file's own check, one line naming it


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_flipped_shard_header_without_hashes_is_one_line_at_load(tmp_path: Path) -> None:
    path = _as_old(_save(tmp_path))
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])
    shard.write_bytes(data)
    with pytest.warns(UserWarning, match="no recorded file hashes"):  # nothing recorded to catch it with
        verify_checkpoint(path)
    with pytest.raises(ConfigError, match="its tensor data cannot be read") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_pickle_hidden_in_a_chunk_is_refused_without_suggesting_weights_only_false(tmp_path: Path) -> None:
    path = _save(tmp_path)
    info = max((v for k, v in read_dcp_metadata(path).storage_data.items() if k.fqn == "model/w"),
               key=lambda v: v.offset)  # fmt: skip
    buffer = io.BytesIO()
    torch.save({"x": pathlib.PurePosixPath("/etc")}, buffer)  # a global weights_only refuses
    payload = bytearray(buffer.getvalue())
    pad = info.length - len(payload)
    payload[-2:] = struct.pack("<H", pad)  # the zip's comment fills the chunk: sizes and offsets stay valid
    shard = path / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = bytes(payload) + b"\0" * pad
    shard.write_bytes(data)
    refused(path, f"{info.relative_path} does not match the sha256")
    _as_old(path)
    with pytest.raises(ConfigError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "pickled object that is not a plain tensor" in message and "pathlib.PurePosixPath" in message
    assert "weights_only" not in message and "\n" not in message


def _enospc_after(monkeypatch, limit: int) -> None:
    """Stream writes fail as a full disk does once `limit` bytes were written in total."""
    written = [0]
    original = manifest_mod._HashingStream.write

    def write(self, data):
        written[0] += memoryview(data).nbytes
        if written[0] > limit:
            self.fs.note_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(manifest_mod._HashingStream, "write", write)


def _assert_disk_full(message: str, root: Path) -> None:
    needed = sum(t.numel() * t.element_size() for t in _state()["model"].values())
    assert "No space left on device" in message and str(root) in message and "\n" not in message, message
    assert f"{needed} bytes" in message or f"{needed + 8} bytes" in message, message  # + the step tensor


@pytest.mark.parametrize("how", ["save_checkpoint", "sync", "async"])
def test_disk_full_removes_the_partial_save_and_says_what_it_needs(tmp_path: Path, monkeypatch, how) -> None:
    _save(tmp_path, 1)
    before = _tree(tmp_path)
    _enospc_after(monkeypatch, 1000)
    with pytest.raises(ConfigError) as info:
        if how == "save_checkpoint":
            _save(tmp_path, 2)
        else:
            writer = CheckpointWriter(tmp_path, async_save=how == "async")
            writer.save(2, _state(2), {}, {"rng": get_rng_state(torch.device("cpu"))})
            writer.wait()
    _assert_disk_full(str(info.value), tmp_path)
    assert _tree(tmp_path) == before  # no .tmp-step_* left to keep the disk full; step 1 and latest unchanged


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_on_a_real_small_tmpfs(small_tmpfs: Path) -> None:
    root = small_tmpfs / "ck"
    save_checkpoint(root, 1, {"model": {"w": torch.zeros(100)}})
    before = _tree(root)
    big = {"model": {"w": torch.zeros(400_000)}}  # 1.6 MB on a 1 MiB disk
    with pytest.raises(ConfigError) as info:
        save_checkpoint(root, 2, big)
    message = str(info.value)
    assert "No space left on device" in message and str(root) in message and "1600000 bytes" in message
    assert _tree(root) == before
    shutil.rmtree(root)
