import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests run in importlib mode (no test directory on sys.path); the tests and the spawned workers here import
# `dist_helpers` and `dist_cases` from beside this file (spawned children inherit sys.path). Unique names.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from dist_helpers import DistPool  # noqa: E402


@pytest.fixture(scope="package")
def dist_pool() -> Iterator[Callable[[int], DistPool]]:
    """`dist_pool(n)`: a pool of n gloo processes, started once for this test package and shared by its tests.

    Package scope, not session: idle workers are not free — every test's meshes leave gloo groups (and their
    threads) behind in each worker, and the pools measurably took ~0.6 of a core from the demo tests that run after
    this package when they lived until the end of the session."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
