"""The preemption handler is a guest: it restores the previous handlers, also when fit() runs twice, and a process
forked while it is installed (a data-loader or pool worker) still dies of SIGTERM."""

from __future__ import annotations

import os
import signal
import time

from framework.train.callbacks.preemption import PreemptionSignal


def test_install_twice_then_uninstall_restores_the_original() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    guard = PreemptionSignal()
    guard.install()
    guard.install()  # fit() called again on the same Checkpointer
    guard.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_signal_is_recorded_here_and_fatal_in_a_forked_child() -> None:
    guard = PreemptionSignal()
    guard.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert guard.agreed() == signal.SIGUSR1
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            time.sleep(30)
            os._exit(0)
        time.sleep(0.5)  # a signal that arrives before CPython's after-fork reset in the child is dropped
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        guard.uninstall()


def test_clear_record_deletes_only_loom_s_record(tmp_path) -> None:
    from framework.train.callbacks.preemption import RECORD, clear_record, write_record

    write_record(tmp_path, 3, tmp_path / "step_00000003", 10)
    clear_record(tmp_path)
    assert not (tmp_path / RECORD).exists()
    for text in ("my notes", '{"signal": "mine"}', "[1, 2]"):
        (tmp_path / RECORD).write_text(text)
        clear_record(tmp_path)
        assert (tmp_path / RECORD).read_text() == text  # not Loom's: kept


def test_ranks_agree_without_waiting_a_step_later(monkeypatch) -> None:
    """Distributed, `agreed` posts the max-reduction of the flag asynchronously and returns the one posted at the
    previous step (no host read of a device value in the step that posts it): a signal received before step s's
    check stops the run after step s + 1, on every rank alike."""
    import torch.distributed as dist

    posted = []
    real = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        posted.append(async_op)
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_reduce", recording)
        guard = PreemptionSignal(distributed=True)
        assert guard.agreed() == 0
        guard.received = signal.SIGUSR1
        assert guard.agreed() == 0  # posted now, read at the next step
        assert guard.agreed() == signal.SIGUSR1
        assert posted == [True, True, True]
    finally:
        dist.destroy_process_group()
