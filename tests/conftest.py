"""Shared fixtures: the bundled demo corpus (built once into data/demo, reused by `make demo`)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests run many tiny models; more threads than cores only adds contention on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def demo_data() -> Path:
    """data/demo built by the same function `loom data demo` uses (a no-op when it is already complete)."""
    from framework.data import build_demo_data

    out = ROOT / "data" / "demo"
    build_demo_data(out)
    return out


@pytest.fixture(autouse=True)
def _no_leaked_signal_handler() -> Iterator[None]:
    """A test that leaves a SIGTERM/SIGUSR1 handler installed in the pytest process (a Checkpointer's
    on_fit_start without on_close) makes later forked workers ignore terminate(), which once hung CI."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    leaked = [sig.name for sig, handler in before.items() if signal.getsignal(sig) is not handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not leaked, f"the test left a handler installed for {leaked}"
