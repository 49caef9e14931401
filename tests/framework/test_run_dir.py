"""framework/run_dir.py without training: the lock's holder record, release, and filesystems that cannot lock."""

from __future__ import annotations

import errno
import logging
import os
import socket

import pytest

import framework.run_dir
from framework.config.errors import ConfigError
from framework.run_dir import LOCK_NAME, lock_holder, run_lock


def test_the_lock_records_its_holder_and_refuses_a_second_holder(tmp_path) -> None:
    with run_lock(tmp_path / "run"):
        assert lock_holder(tmp_path / "run") | {"started": None} == {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": None,
        }
        # a second open file description of the same file is a second holder, also in one process
        held = rf"in use by another loom train \(host .*, pid {os.getpid()}"
        with pytest.raises(ConfigError, match=held), run_lock(tmp_path / "run"):
            pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # released: no holder recorded
    with run_lock(tmp_path / "run"):  # and free again
        pass


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog, code) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(framework.run_dir.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="framework.run_dir"), run_lock(tmp_path / "run"):
        pass
    assert "cannot be locked here" in caplog.text


def test_another_lock_error_is_not_hidden(tmp_path, monkeypatch) -> None:
    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(framework.run_dir.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"), run_lock(tmp_path / "run"):
        pass
