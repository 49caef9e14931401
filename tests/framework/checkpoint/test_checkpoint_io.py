import json
import os

import pytest
import torch

import framework.checkpoint.io as ckpt_io
from framework.checkpoint import (
    LATEST,
    MARKER,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from framework.checkpoint.tree import merge_tensors, split_tensors
from framework.config import ConfigError
from framework.outputs import OWNER_MARK, mark_owned


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "layers.0.w": torch.randn(3, 4, generator=g),
            "emb": torch.randn(5, 2, generator=g).bfloat16(),
        },
        "optimizer": {
            "state": {
                "layers.0.w": {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(3, 4, generator=g)}
            },
            "param_groups": [{"lr": 0.1 + seed, "betas": [0.9, 0.95], "params": ["layers.0.w"]}],
        },
        "counters": {"step": seed, "ids": torch.arange(4)},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    else:
        assert a == b


def _visible(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_tree_split_and_merge_round_trip():
    state = _state(1)
    tensors, plain = split_tensors(state)
    assert set(tensors) == {"model/layers.0.w", "model/emb", "optimizer/state/layers.0.w/step",
                            "optimizer/state/layers.0.w/exp_avg", "counters/ids"}  # fmt: skip
    json.dumps(plain)
    _assert_same(merge_tensors(plain, tensors), state)
    with pytest.raises(ValueError, match="inside a list"):
        split_tensors({"a": [torch.zeros(1)]})


def test_save_and_load_round_trip_exactly(tmp_path):
    path = save_checkpoint(tmp_path, 7, _state(7), {"tokens": 99, "data_state": {"pos": 3}})
    assert path == tmp_path / "step_00000007" and (path / MARKER).is_file()
    assert (tmp_path / LATEST).read_text().strip() == "step_00000007"
    loaded = load_checkpoint(tmp_path)  # the root follows `latest`
    _assert_same(loaded.state, _state(7))
    assert loaded.metadata == {"tokens": 99, "data_state": {"pos": 3}, "format_version": 1, "step": 7}


def test_dcp_holds_tensors_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    metadata = torch.distributed.checkpoint.FileSystemReader(path).read_metadata()
    kinds = {type(item).__name__ for item in metadata.state_dict_metadata.values()}
    assert kinds == {"TensorStorageMetadata"}  # no pickled Python objects (BytesStorageMetadata)


def test_load_fills_template_tensors_in_place(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    template = _state(2)
    live = template["model"]["layers.0.w"]
    loaded = load_checkpoint(tmp_path / "step_00000001", template=template)
    assert loaded.state["model"]["layers.0.w"] is live and torch.equal(live, _state(1)["model"]["layers.0.w"])


def _fail_in_metadata(*args, **kwargs):
    raise OSError("disk full (injected)")


def _fail_in_dcp(self, *args, **kwargs):
    raise OSError("device error (injected)")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("target", "replacement", "error"),
    [
        ("_write_json", _fail_in_metadata, OSError),  # after DCP wrote the tensors
        (
            "dcp.FileSystemWriter.write_data",
            _fail_in_dcp,
            OSError,
        ),  # inside DCP (wrapped in a BaseException there; unwrapped so the CLI prints errno's words)
        ("_fsync_tree", _interrupt, KeyboardInterrupt),  # not even an Exception
    ],
)
def test_failed_save_leaves_previous_checkpoint_and_latest_intact(
    tmp_path, monkeypatch, target, replacement, error
):
    save_checkpoint(tmp_path, 1, _state(1))
    before = _visible(tmp_path)
    owner, _, attr = target.rpartition(".")
    obj = ckpt_io
    for part in owner.split(".") if owner else []:
        obj = getattr(obj, part)
    monkeypatch.setattr(obj, attr, replacement)
    with pytest.raises(error):
        save_checkpoint(tmp_path, 2, _state(2))
    monkeypatch.undo()
    assert _visible(tmp_path) == before == ["latest", "step_00000001"]  # no step_00000002, no temp leftovers
    assert (tmp_path / LATEST).read_text().strip() == "step_00000001"
    _assert_same(load_checkpoint(tmp_path).state, _state(1))


def test_load_refuses_a_directory_without_the_marker(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    os.remove(path / MARKER)
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        load_checkpoint(tmp_path)  # `latest` names it
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "step_00000099")


def test_wrong_format_version_is_a_config_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _state(1))
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 999}))
    with pytest.raises(ConfigError, match="format version 999"):
        load_checkpoint(path)


def test_keep_last_retains_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert _visible(tmp_path) == ["latest", "step_00000003", "step_00000004"]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, _state(1))
    save_checkpoint(tmp_path, 5, _state(2))
    assert _visible(tmp_path) == ["latest", "step_00000005"]
    _assert_same(load_checkpoint(tmp_path).state, _state(2))


def test_stale_temp_dirs_are_removed_only_when_loom_made_them(tmp_path):
    ckpt_io.make_temp_dir(tmp_path, "step_00000009-1-abc")  # a crashed save's, marked as Loom's
    ckpt_io.make_temp_dir(tmp_path, "latest-0123abcd")  # a crashed `latest` update's
    mine = tmp_path / ".tmp-mine"  # the user's own, named like Loom's temps
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / ".tmp-file").write_text("keep me too")
    saved = save_checkpoint(tmp_path, 3, _state(3))
    mark_owned(saved, ckpt_io.TEMP_KIND)  # a crash between a commit's rename and its marker's removal
    removed = ckpt_io.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-latest-0123abcd", ".tmp-step_00000009-1-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-file", ".tmp-mine", "latest", "step_00000003"]
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "sub").is_dir()
    _assert_same(load_checkpoint(tmp_path).state, _state(3))


def test_committed_directories_hold_no_owner_marker(tmp_path):
    for step in (1, 2, 3, 3):  # the second 3 replaces the first (its old directory goes to marked trash)
        save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    for path in tmp_path.glob("step_*"):
        assert not (path / OWNER_MARK).exists()
