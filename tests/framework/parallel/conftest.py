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


class _Pools:
    """The worker pools of this folder's tests, by world size; closed after the folder's last test."""

    def __init__(self) -> None:
        self.by_size: dict[int, DistPool] = {}

    def get(self, world_size: int) -> DistPool:
        if world_size not in self.by_size:
            self.by_size[world_size] = DistPool(world_size)
        return self.by_size[world_size]

    def close(self) -> None:
        for pool in self.by_size.values():
            pool.close()
        self.by_size.clear()


_POOLS = _Pools()


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[Callable[[int], DistPool]]:
    """`dist_pool(n)`: a pool of n gloo processes, started on first use and shared by every test of this folder.

    Closed as soon as the run leaves this folder (`pytest_runtest_teardown` below), not at the end of the session:
    idle workers are not free — each test's meshes leave gloo groups and their threads behind in every worker, and
    pools kept alive until the session's end were measured taking ~0.6 of a core from the demo tests that follow.
    (A package-scoped fixture would not do: without __init__.py files this folder is no package, so pytest would
    keep it for the whole session.)"""
    yield _POOLS.get
    _POOLS.close()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or Path(_HERE) not in Path(nextitem.path).resolve().parents:
        _POOLS.close()
