"""The write rule of framework/outputs.py: temp sibling + rename, refusals, owned-only cleanup."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from framework.config.errors import ConfigError
from framework.outputs import (
    OWNER_MARK,
    atomic_dir,
    atomic_file,
    check_output,
    describe_os_error,
    move_aside,
    read_json_file,
    remove_if_owned,
)


@pytest.mark.parametrize("relation", ["same", "inside_input", "holds_input"])
def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path: Path, relation: str) -> None:
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.jsonl").write_text("{}")
    out = {"same": src, "inside_input": src / "sub", "holds_input": tmp_path}[relation]
    with pytest.raises(ConfigError, match="input"):
        check_output(out, inputs=[src], overwrite=True)


def test_file_input_given_as_output_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("{}")
    with pytest.raises(ConfigError, match="input"):
        check_output(src, inputs=[src], overwrite=True, want_dir=False)
    assert src.read_text() == "{}"


def test_existing_output_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_output(out)  # empty: fine
    (out / "x").write_text("user")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_output(out)
    check_output(out, overwrite=True)
    file = tmp_path / "f"
    file.write_text("user")
    with pytest.raises(ConfigError, match="is a file"):
        check_output(file, overwrite=True)


def test_atomic_dir_replaces_whole_and_failure_leaves_old(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-shard").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, "test", overwrite=True) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old-shard").read_text() == "old"
    with atomic_dir(out, "test", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]  # no mix, no marker left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_failure_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "m.model"
    with pytest.raises(ValueError), atomic_file(out) as tmp:
        tmp.write_text("x")
        raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(out) as tmp:
        tmp.write_text("done")
    assert out.read_text() == "done" and list(tmp_path.iterdir()) == [out]


def test_cleanup_deletes_only_marked_directories(tmp_path: Path) -> None:
    mine, users = tmp_path / ".tmp-a", tmp_path / ".tmp-b"
    mine.mkdir()
    users.mkdir()
    (users / "notes").write_text("keep")
    (mine / OWNER_MARK).write_text('{"kind": "k"}')
    assert not remove_if_owned(mine, "other")
    assert remove_if_owned(mine, "k") and not mine.exists()
    assert not remove_if_owned(users) and (users / "notes").read_text() == "keep"


def test_move_aside_keeps_the_old(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("1")
    aside = move_aside(run)
    assert aside.name == "run.old-1" and (aside / "x").read_text() == "1" and not run.exists()


def test_read_json_file_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "meta.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json_file(bad, "checkpoint meta.json")
    with pytest.raises(ConfigError, match="missing"):
        read_json_file(tmp_path / "nope.json", "x")


def test_describe_os_error_names_path_and_words() -> None:
    line = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/ckpt/x"))
    assert line == "/ckpt/x: No space left on device"
