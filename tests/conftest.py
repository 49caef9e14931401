"""Shared fixtures: the bundled demo corpus (built once into data/demo, reused by `make demo`)."""

from __future__ import annotations

import os
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
