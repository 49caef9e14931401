import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# importlib mode: put this folder (dist_cases_deepspeed) and the parallel tests' folder (DistPool, tiny recipes)
# on sys.path for the tests and the spawned workers.
_HERE = Path(__file__).resolve().parent
for _path in (_HERE, _HERE.parent / "parallel"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from dist_helpers import DistPool  # noqa: E402


@pytest.fixture(scope="module")
def ds_pool() -> Iterator[Callable[[int], DistPool]]:
    """`ds_pool(n)`: n gloo worker processes shared by this module's tests, closed after them."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
