"""consolidate / inspect of a single-process checkpoint, against the state that was saved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework.checkpoint import save_checkpoint
from framework.checkpoint.inspect import format_report, inspect_checkpoint
from framework.config import ConfigError, ModelConfig, Recipe
from framework.config.loader import recipe_to_dict
from framework.convert.consolidate import consolidate, read_model_state
from framework.run import materialize_model
from framework.train import TrainModule

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(checkpoint root, the state it holds) of a tiny model after one AdamW step."""
    recipe = Recipe(model=ModelConfig(**TINY))
    module = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    ids = torch.arange(16)[None] % 64
    module.train_batch([{"input_ids": ids, "labels": ids}])
    module.optim_step()
    state = module.state_dict()
    root = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(root, 1, state, {"tokens": 16, "recipe": recipe_to_dict(recipe)})
    return root, state


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_equal_states(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_consolidate_equals_the_model_state_dict(saved: tuple[Path, dict], tmp_path: Path) -> None:
    root, state = saved
    out = consolidate(root, tmp_path / "out")  # the root: follows `latest`
    assert_equal_states(read_safetensors(out), state["model"])
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.json", "model.safetensors", "recipe.yaml"]
    index = json.loads((out / "consolidated.json").read_text())
    assert (index["step"], index["tokens"], index["layout"]) == (1, 16, "unknown")
    assert index["tensors"]["output.weight"]["shape"] == list(state["model"]["output.weight"].shape)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"] == recipe_to_dict(Recipe(model=ModelConfig(**TINY)))["model"]


def test_consolidate_casts_and_shards(saved: tuple[Path, dict], tmp_path: Path) -> None:
    root, state = saved
    out = consolidate(root / "step_00000001", tmp_path / "out", dtype="bf16", max_shard_bytes=20_000)
    expected = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state["model"].items()}
    assert_equal_states(read_safetensors(out), expected)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and weight_map.keys() == expected.keys()


def test_only_model_keys_are_read(saved: tuple[Path, dict]) -> None:
    root, state = saved
    loaded = read_model_state(root)
    assert loaded.meta["step"] == 1 and loaded.tensors.keys() == state["model"].keys()


def test_consolidate_refuses_a_used_output_folder_and_a_bad_dtype(
    saved: tuple[Path, dict], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already exists"):
        consolidate(saved[0], tmp_path / "out")
    with pytest.raises(ConfigError, match="--dtype"):
        consolidate(saved[0], tmp_path / "new", dtype="int8")
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_output_whole(saved: tuple[Path, dict], tmp_path: Path) -> None:
    """An old sharded consolidation is not left beside the new single file (a mix that loads as neither)."""
    root, state = saved
    consolidate(root, tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with pytest.raises(ConfigError, match="already exists"):
        consolidate(root, tmp_path / "out")
    consolidate(root, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "consolidated.json", "model.safetensors", "recipe.yaml"
    ]  # fmt: skip
    assert_equal_states(read_safetensors(tmp_path / "out"), state["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_an_output_inside_the_checkpoint_is_refused(saved: tuple[Path, dict], tmp_path: Path) -> None:
    root = Path(shutil.copytree(saved[0], tmp_path / "run" / "ckpt"))
    step = root / "step_00000001"
    for out in (root, root / "consolidated", step, step / "x", root.parent):  # is, inside, holding
        with pytest.raises(ConfigError, match="the input"):
            consolidate(root, out, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert sorted(p.name for p in step.iterdir()) == sorted(p.name for p in (saved[0] / step.name).iterdir())


def test_a_failed_write_leaves_no_output(
    saved: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("framework.convert.consolidate._write_index", fail)
    with pytest.raises(OSError, match="No space"):
        consolidate(saved[0], tmp_path / "a" / "out")
    assert list(tmp_path.iterdir()) == []  # neither OUT, nor its staging folder, nor the parent it made


def test_inspect_lists_every_tensor_with_its_global_shape(saved: tuple[Path, dict]) -> None:
    from framework.checkpoint.tree import split_tensors

    root, state = saved
    report = inspect_checkpoint(root)
    flat = split_tensors(state)[0]
    assert {row["key"]: row["shape"] for row in report["tensors"]} == {
        "loom/step": [],  # the step as a tensor, cross-checked against meta.json
        **{k: list(v.shape) for k, v in flat.items()},
    }
    assert report["total_bytes"] == 8 + sum(v.numel() * v.element_size() for v in flat.values())  # + step
    assert all(row["chunks"] == 1 for row in report["tensors"])
    assert (report["step"], report["tokens"], report["format_version"], report["layout"]) == (
        1,
        16,
        1,
        "unknown",
    )
    assert report["complete"] and report["files_ok"]
    assert report["model"]["d_model"] == 32
    assert report["model"]["parameters"] == sum(v.numel() for v in state["model"].values())
    text = format_report(report)
    assert "layout:         unknown" in text and "model/output.weight" in text and "64x32" in text
    json.dumps(report)  # --json prints it


def test_inspect_reports_damage_instead_of_refusing(saved: tuple[Path, dict], tmp_path: Path) -> None:
    step = Path(shutil.copytree(saved[0] / "step_00000001", tmp_path / "step_00000001"))
    (shard,) = step.glob("*.distcp")
    os.truncate(shard, 100)
    (step / "COMPLETE").unlink()
    report = inspect_checkpoint(step)
    assert not report["complete"] and not report["files_ok"]
    size = (saved[0] / "step_00000001" / shard.name).stat().st_size
    assert report["file_problems"] == [  # against the manifest recorded at commit, and against DCP's index
        f"{shard.name} has 100 bytes, {size} when it was written (truncated or changed)",
        f"shard file {shard.name} is truncated: 100 bytes, the index needs {size}",
    ]
    assert "NO (no COMPLETE marker" in format_report(report)
