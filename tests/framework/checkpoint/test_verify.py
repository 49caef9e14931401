"""verify_checkpoint / check_compatible on checkpoints written by save_checkpoint, then damaged: each damage is one
ConfigError line naming what is wrong, raised before any tensor is read."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from framework.checkpoint import save_checkpoint
from framework.checkpoint.manifest import MANIFEST
from framework.checkpoint.verify import (
    SafeFileSystemReader,
    check_compatible,
    read_dcp_metadata,
    verify_checkpoint,
)
from framework.config import ConfigError, ModelConfig, Recipe
from framework.run import materialize_model
from framework.train import TrainModule

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)


def train_state(**overrides: int) -> dict:
    """A TrainModule's state (model, optimizer after one step, scheduler...) as training checkpoints it."""
    recipe = Recipe(model=ModelConfig(**TINY | overrides))
    module = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    ids = torch.arange(16)[None] % 64
    module.train_batch([{"input_ids": ids, "labels": ids}])
    module.optim_step()  # so the optimizer state holds moments
    return module.state_dict()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 7, train_state(), {"tokens": 112})


@pytest.fixture(params=["hashed", "old"])
def ckpt(saved: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A private copy of the saved step directory, free to damage: as written ("hashed": the manifest catches
    every damage first) or as a Loom without manifests wrote it ("old": the file-level checks must)."""
    path = Path(shutil.copytree(saved, tmp_path / saved.name))
    if request.param == "old":
        (path / MANIFEST).unlink()
        (path / "COMPLETE").write_text(json.dumps({"step": 7}))
    return path


def is_old(path: Path) -> bool:
    return not (path / MANIFEST).exists()


def refused(path: Path, *expected: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an old checkpoint's "cannot be verified"
        with pytest.raises(ConfigError) as info:
            verify_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and all(e in message for e in expected), message
    return message


def test_intact_checkpoint_passes_and_matches_its_model(ckpt: Path) -> None:
    if is_old(ckpt):
        with pytest.warns(UserWarning, match="no recorded file hashes"):
            assert verify_checkpoint(ckpt)["hashes"] == "not recorded"
    else:
        assert verify_checkpoint(ckpt)["hashes"] == "checked"
    check_compatible(ckpt, train_state())


def test_missing_marker(ckpt: Path) -> None:
    (ckpt / "COMPLETE").unlink()
    refused(ckpt, "no COMPLETE marker")


def test_missing_or_unreadable_meta_json(ckpt: Path) -> None:
    (ckpt / "meta.json").write_text('{"step": 7, "state": {')  # cut short
    refused(ckpt, "meta.json", "is not valid JSON" if is_old(ckpt) else "when it was written")
    (ckpt / "meta.json").unlink()
    refused(ckpt, "has no meta.json" if is_old(ckpt) else "meta.json is missing (listed in MANIFEST.json)")


def test_missing_dcp_metadata(ckpt: Path) -> None:
    (ckpt / ".metadata").unlink()
    refused(ckpt, "has no .metadata" if is_old(ckpt) else ".metadata is missing (listed in MANIFEST.json)")


def test_missing_shard_file(ckpt: Path) -> None:
    (shard,) = ckpt.glob("*.distcp")
    shard.unlink()
    refused(
        ckpt, f"shard file {shard.name} is missing" if is_old(ckpt) else f"{shard.name} is missing (listed"
    )


def test_truncated_shard_file(ckpt: Path) -> None:
    (shard,) = ckpt.glob("*.distcp")
    size = shard.stat().st_size
    os.truncate(shard, size - 1)  # the last tensor loses its last byte
    if is_old(ckpt):
        refused(ckpt, f"shard file {shard.name} is truncated: {size - 1} bytes, the index needs {size}")
    else:
        refused(ckpt, f"{shard.name} has {size - 1} bytes, {size} when it was written")


class _Payload:
    """A pickle that makes a directory when unpickled: what a crafted .metadata could do with plain pickle."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.target),))


def test_crafted_metadata_is_refused_without_running_it(ckpt: Path, tmp_path: Path) -> None:
    payload = pickle.dumps(_Payload(tmp_path / "ran"))
    pickle.loads(payload)  # the reference: plain unpickling runs it
    assert (tmp_path / "ran").is_dir()
    (tmp_path / "ran").rmdir()
    (ckpt / ".metadata").write_bytes(payload)
    refused(
        ckpt,
        *((".metadata", "unreadable", "refused global posix.mkdir") if is_old(ckpt) else (".metadata has",)),
    )
    assert not (tmp_path / "ran").exists()


def test_safe_reader_reads_what_dcp_reads(ckpt: Path) -> None:
    import torch.distributed.checkpoint as dcp

    ours, theirs = SafeFileSystemReader(ckpt).read_metadata(), dcp.FileSystemReader(ckpt).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data and len(ours.storage_data) > 10
    assert read_dcp_metadata(ckpt).planner_data == theirs.planner_data


def test_another_model_width_names_keys_and_both_shapes(ckpt: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_compatible(ckpt, train_state(d_model=48))
    message = str(info.value)
    assert "\n" not in message and "holds another model" in message
    # the first differing key in sorted order, with the checkpoint's shape then the model's
    assert (
        "model/layers.0.attention.wk.weight is [32, 32] in the checkpoint, [48, 48] in the model" in message
    )
    assert "more)" in message


def test_another_model_depth_names_missing_and_unexpected_keys(ckpt: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model/layers\.2\.\S+ \[\d+(, \d+)*\] is missing from the checkpoint"
    ):
        check_compatible(ckpt, train_state(n_layers=3))
    state = train_state(n_layers=1)
    with pytest.raises(
        ConfigError, match=r"model/layers\.1\.\S+ \[.*\] is in the checkpoint but not in the model"
    ):
        check_compatible(ckpt, state)
    # a flat template ('/'-joined keys, as DCP holds them) is understood too
    flat = {f"model/{k}": v for k, v in state["model"].items()}
    with pytest.raises(ConfigError, match="is in the checkpoint but not in the model"):
        check_compatible(ckpt, flat)
    # a pipeline stage holds part of the model: the other stages' keys are expected, a wrong shape is not
    check_compatible(ckpt, flat, partial=True)
    flat["model/output.weight"] = torch.empty(3, 3)
    with pytest.raises(ConfigError, match=r"model/output.weight is \[64, 32\] in the checkpoint, \[3, 3\]"):
        check_compatible(ckpt, flat, partial=True)
