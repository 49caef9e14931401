"""`loom ckpt inspect|consolidate` in-process, and checkpoint damage through every command that reads a checkpoint:
one line on stderr, exit status 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint import save_checkpoint
from framework.config import ModelConfig, Recipe
from framework.config.loader import recipe_to_dict
from framework.run import materialize_model
from launcher.cli import EXIT_USER_ERROR, main, run

TINY = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_hidden=64, max_seq_len=16)


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(step directory, model state) of a checkpoint holding a model and some optimizer-like state."""
    recipe = Recipe(model=ModelConfig(**TINY))
    model = materialize_model(recipe.model, torch.device("cpu"), 0).state_dict()
    state = {"model": model, "optimizer": {"state": {"output.weight": {"exp_avg": torch.ones(64, 32)}}}}
    path = save_checkpoint(tmp_path / "run", 3, state, {"tokens": 48, "recipe": recipe_to_dict(recipe)})
    return path, model


def user_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR and err.startswith("loom: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    return err


def test_inspect_prints_table_and_json(capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict]) -> None:
    path, model = ckpt
    assert run(["ckpt", "inspect", str(path.parent)]) == 0
    text = capsys.readouterr().out
    assert f"checkpoint:     {path}" in text and "step:           3" in text and "tokens:         48" in text
    assert "optimizer/state/output.weight/exp_avg  64x32" in text
    assert run(["ckpt", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model_rows = {r["key"]: r["shape"] for r in report["tensors"] if r["key"].startswith("model/")}
    assert model_rows == {f"model/{k}": list(v.shape) for k, v in model.items()}


def test_consolidate_writes_the_model(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict], tmp_path: Path
) -> None:
    path, model = ckpt
    assert run(["ckpt", "consolidate", str(path), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'}\n"
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == model.keys() and all(torch.equal(got[k], v) for k, v in model.items())


def test_damaged_checkpoints_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = ckpt
    assert "no such checkpoint directory" in user_error(capsys, "ckpt", "inspect", tmp_path / "nope")
    assert "required" in user_error(capsys, "ckpt")
    (shard,) = path.glob("*.distcp")
    os.truncate(shard, shard.stat().st_size // 2)
    err = user_error(capsys, "ckpt", "consolidate", path, tmp_path / "out")
    assert f"{shard.name} has " in err and "when it was written" in err and not (tmp_path / "out").exists()
    shard.unlink()
    err = user_error(capsys, "convert", path, "--to", "hf", tmp_path / "hf")
    assert f"{shard.name} is missing" in err and not (tmp_path / "hf").exists()
    (path / "COMPLETE").unlink()
    assert "no COMPLETE marker" in user_error(capsys, "ckpt", "consolidate", path, tmp_path / "out")
