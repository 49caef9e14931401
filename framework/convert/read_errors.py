"""One line for shard data torch cannot load, as conversion reads a megatron torch_dist checkpoint (a Loom
checkpoint is read through framework.checkpoint.verify.load_tensors, which does the same)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from framework.checkpoint.verify import dcp_read_error


@contextlib.contextmanager
def shard_read_errors(directory: str | Path, key: str = "source") -> Iterator[None]:
    """Turn a failed DCP read of the checkpoint `directory` into one ConfigError naming it."""
    try:
        yield
    except CheckpointException as error:
        raise dcp_read_error(
            Path(directory), error, key, "copy the checkpoint again from a source you trust"
        ) from None
