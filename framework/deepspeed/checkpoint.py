"""DeepSpeed checkpoints inside Loom's checkpoint directories, and reading them without running pickled code.

A step directory of a DeepSpeed run is an ordinary Loom checkpoint (meta.json with the data position, step,
recipe and layout; rank_XXXXX.json with RNG states; COMPLETE; committed atomically by the CheckpointWriter) whose
model and optimizer live in `deepspeed/`, written by DeepSpeed's own `engine.save_checkpoint` (each rank its ZeRO
partition). DeepSpeed writes those files with torch.save (pickles) and reads them back with
`torch.load(weights_only=False)`, which would run any code a crafted file carries. Loom never lets it: while
Loom asks DeepSpeed to load, every torch.load is made `weights_only=True` with an allowlist of the three plain
DeepSpeed data classes its files contain (measured on 0.19.8: the ZeRO stage enum, the loss scaler's settings,
the fragment addresses of ZeRO-1/2); anything else fails with one line naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from framework.config.errors import ConfigError

ENGINE_DIR = "deepspeed"
"""The subdirectory (DeepSpeed's checkpoint `tag`) holding DeepSpeed's files inside a Loom step directory."""
ALLOWED = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def is_deepspeed_checkpoint(step_dir: Path) -> bool:
    return (Path(step_dir) / ENGINE_DIR).is_dir()


def allowed_classes() -> list[type]:
    return [getattr(importlib.import_module(module), name) for module, name in ALLOWED]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every torch.load (DeepSpeed's own calls included) loads tensors and allowlisted classes only."""
    original = torch.load

    @functools.wraps(original)
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines() if "global" in line.lower()]
            first = lines[0] if lines else repr(error)  # torch names the unpickled global on such a line
            raise ConfigError(
                None, "checkpoint", str(f), f"holds objects outside Loom's allowlist of DeepSpeed classes ({first})",
                "use a checkpoint written by Loom's DeepSpeed engine (DeepSpeed 0.19.8)",
            ) from None  # fmt: skip

    with torch.serialization.safe_globals(allowed_classes()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def read_deepspeed_model(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model of a DeepSpeed step directory (ZeRO partitions merged by DeepSpeed's zero_to_fp32),
    in one process without a process group, under the weights-only policy above."""
    try:
        zero_to_fp32 = importlib.import_module("deepspeed.utils.zero_to_fp32")
    except ImportError as err:
        from framework.deepspeed.config import DEEPSPEED_HINT

        raise ConfigError(
            None, "checkpoint", str(step_dir), f"was written by the DeepSpeed engine; reading it needs deepspeed ({err})",
            DEEPSPEED_HINT,
        ) from err  # fmt: skip
    with weights_only_loads():
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=ENGINE_DIR)
    return {name: tensor.detach().clone() for name, tensor in state.items()}
