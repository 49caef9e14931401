"""Atomic, pickle-free directory checkpoints (tensors via torch.distributed.checkpoint, the rest as JSON)."""

from framework.checkpoint.io import (
    FORMAT_VERSION,
    LATEST,
    MARKER,
    CheckpointError,
    LoadedCheckpoint,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temps,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from framework.checkpoint.rng import get_rng_state, set_rng_state

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "MARKER",
    "CheckpointError",
    "LoadedCheckpoint",
    "complete_checkpoints",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "remove_stale_temps",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "step_dir_name",
]
