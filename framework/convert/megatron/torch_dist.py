"""megatron-core's `torch_dist` checkpoint format, read and written with torch.distributed.checkpoint alone
(megatron-core itself is not needed).

A torch_dist directory holds a DCP checkpoint (`.metadata` + `__R_N.distcp` shards) whose tensors carry their
*global* shapes, whatever tensor/pipeline/expert-parallel layout saved them, plus `metadata.json` (which backend
wrote it) and `common.pt` (a torch pickle of the non-sharded state). Reading here: only the tensor entries are
requested from DCP, so the pickled `_extra_state` byte entries are never unpickled, and `.metadata` goes through a
restricted unpickler. `common.pt` is not read at all (megatron-core's GPT model keeps nothing Loom needs in it).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md

from framework.checkpoint.verify import (
    DCP_METADATA,
    SafeFileSystemReader,
    _MetadataUnpickler,
    storage_problems,
)
from framework.config.errors import ConfigError
from framework.convert.read_errors import shard_read_errors
from framework.outputs import OWNER_MARK

FORMAT_FILE = "metadata.json"
COMMON_FILE = "common.pt"
FORMAT = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# megatron-core's save planner keeps the ranks' save plans in `.metadata` beside DCP's own classes
_PLANNER_GLOBALS = {
    ("torch.distributed.checkpoint.planner", name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
}


class _Unpickler(_MetadataUnpickler):
    """DCP metadata classes plus the save-plan classes megatron-core's planner stores; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLANNER_GLOBALS:
            return pickle.Unpickler.find_class(self, module, name)
        return super().find_class(module, name)


def _error(path: Path, rule: str, fix: str) -> ConfigError:
    return ConfigError(None, "source", str(path), rule, fix)


LATEST = "latest_checkpointed_iteration.txt"


def resolve(source: str | Path) -> Path:
    """A Megatron-LM save folder (with latest_checkpointed_iteration.txt) -> its latest iter_XXXXXXX (or
    release) folder; any other path is returned as is."""
    source = Path(source)
    latest = source / LATEST
    if not latest.is_file():
        return source
    text = latest.read_text().strip()
    if text != "release" and not text.isdigit():
        raise _error(
            latest, f"holds {text!r}, not an iteration number or 'release'", "pass an iter_XXXXXXX folder"
        )
    return source / ("release" if text == "release" else f"iter_{int(text):07d}")


def read_metadata(directory: Path) -> dcp_md.Metadata:
    """The DCP index of a torch_dist checkpoint (ConfigError if it is not one)."""
    fmt = directory / FORMAT_FILE
    if not fmt.is_file() or not (directory / DCP_METADATA).is_file():
        raise _error(
            directory, f"is not a megatron-core distributed checkpoint (no {FORMAT_FILE} or {DCP_METADATA})",
            "pass the iter_XXXXXXX folder megatron saved with --ckpt-format torch_dist (dist_checkpointing.save)",
        )  # fmt: skip
    backend = json.loads(fmt.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise _error(
            directory, f"was saved with sharded_backend {backend!r}; only torch_dist is read",
            "re-save it with megatron-core's torch_dist backend (--ckpt-format torch_dist)",
        )  # fmt: skip
    try:
        with open(directory / DCP_METADATA, "rb") as f:
            metadata = _Unpickler(f).load()
    except Exception as error:  # noqa: BLE001 - any parse failure means the same to the user
        raise _error(
            directory, f"its {DCP_METADATA} is unreadable ({error})", "copy the checkpoint again"
        ) from None
    problems = storage_problems(directory, metadata)
    if problems:
        raise _error(directory, problems[0], "copy the checkpoint again")
    return metadata


def read_tensors(
    directory: str | Path, keep: Callable[[str], bool] = lambda _: True
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose sharded key passes `keep`, as full (global) tensors, in one process; the
    others (optimizer moments: twice the model in fp32) are neither allocated nor read."""
    directory = Path(directory)
    targets = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in read_metadata(directory).state_dict_metadata.items()
        if isinstance(item, dcp_md.TensorStorageMetadata) and keep(key)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        with shard_read_errors(directory):
            dcp.load(targets, storage_reader=_Reader(directory), no_dist=True)
    return targets


class _Reader(SafeFileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or dcp_md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def write_tensors(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """A torch_dist checkpoint holding `state` (global tensors under megatron's sharded keys), one process.

    `common.pt` is required by megatron-core's loader (`dist_checkpointing.load` reads it first); it is written as
    an empty dict, which torch.load(weights_only=True) reads back: no object of Loom's is pickled."""
    directory = Path(directory)
    # the marker of a staging folder (framework.outputs.atomic_dir) is not content
    if directory.exists() and any(p.name != OWNER_MARK for p in directory.iterdir()):
        raise ConfigError(
            "command line", "OUT", str(directory), "exists and is not empty", "pass a new folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    torch.save({}, directory / COMMON_FILE)
    (directory / FORMAT_FILE).write_text(json.dumps(FORMAT))
    return directory
