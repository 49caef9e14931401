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


def test_consolidate_into_a_used_folder_needs_overwrite(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict], tmp_path: Path
) -> None:
    path, model = ckpt
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_bytes(b"an older model")
    err = user_error(capsys, "ckpt", "consolidate", path, tmp_path / "out")
    assert "already exists" in err and "--overwrite" in err
    assert (tmp_path / "out" / "model-00001-of-00002.safetensors").read_bytes() == b"an older model"
    assert run(["ckpt", "consolidate", str(path), str(tmp_path / "out"), "--overwrite"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'}\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "consolidated.json", "model.safetensors", "recipe.yaml"
    ]  # fmt: skip
    assert "the input" in user_error(capsys, "ckpt", "consolidate", path, path / "out", "--overwrite")


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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_middle(shard: Path, size: int = 4096) -> None:
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + size] = bytes(b ^ 0xFF for b in data[middle : middle + size])
    shard.write_bytes(data)  # same size: only the sha256 tells


def test_verify_prints_one_ok_line_or_one_error_line(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = ckpt
    assert run(["ckpt", "verify", str(path.parent)]) == 0  # a root: follows 'latest'
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and out.out.startswith(f"ok: {path}: step 3, ") and out.err == ""
    assert "sha256 of every file matches the manifest" in out.out
    (shard,) = path.glob("*.distcp")
    _flip_middle(shard)
    before = _tree(tmp_path)
    err = user_error(capsys, "ckpt", "verify", path)
    assert f"{shard.name} does not match the sha256 recorded when it was written" in err
    assert "files:          ok" not in capture_inspect(capsys, path)
    assert _tree(tmp_path) == before


def capture_inspect(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    assert run(["ckpt", "inspect", str(path)]) == 0
    return capsys.readouterr().out


def test_verify_of_an_old_checkpoint_says_its_contents_are_unverified(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict]
) -> None:
    path, _ = ckpt
    (path / "MANIFEST.json").unlink()
    (path / "COMPLETE").write_text(json.dumps({"step": 3}))
    assert run(["ckpt", "verify", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and "no file hashes recorded" in out.out and out.err == ""
    assert "file hashes:    not recorded" in capture_inspect(capsys, path)


def test_a_pickled_entry_is_never_files_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    step = tmp_path / "step_00000001"
    with pytest.warns(UserWarning):  # DCP: no process group
        dcp.save({"model/w": torch.ones(3), "extra": {"not": "a tensor"}}, checkpoint_id=step, no_dist=True)
    (step / "meta.json").write_text(json.dumps({"format_version": 1, "step": 1, "state": {}}))
    (step / "COMPLETE").write_text(json.dumps({"step": 1}))
    text = capture_inspect(capsys, step)
    assert "files:          holds a pickled (non-tensor) entry 'extra.not'" in text, text
    assert "pickled (non-tensor) entry 'extra.not'" in user_error(capsys, "ckpt", "verify", step)


def test_consolidate_and_convert_refuse_changed_bytes(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = ckpt
    (shard,) = path.glob("*.distcp")
    _flip_middle(shard)
    before = _tree(tmp_path)
    for argv in (
        ("ckpt", "consolidate", path, tmp_path / "out"),
        ("convert", path, "--to", "hf", tmp_path / "hf"),
    ):
        err = user_error(capsys, *argv)
        assert f"{shard.name} does not match the sha256" in err, err
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


def _train(demo_data: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = {
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.kv_heads": 2, "model.ffn_hidden": 64,
        "data.tokenizer": demo_data / "tokenizer.model", "data.train": demo_data, "data.validation": "null",
        "data.verify": "size", "train.steps": 4, "train.global_batch_size": 2, "train.micro_batch_size": 2,
        "train.device": "cpu", "checkpoint.every": 2, "logging.run_dir": run_dir,
        "logging.progress_bar": "false", "logging.tensorboard": "false",
    }  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    return ["train", str(root / "recipes/debug.yaml"), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            *extra]  # fmt: skip


def test_resume_auto_falls_back_past_a_changed_checkpoint_and_refuses_when_none_verifies(
    demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    mine = checkpoints / ".tmp-mine"  # the user's own folder, named like Loom's temps: it survives every run
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert main(_train(demo_data, run_dir)) == 0
    assert (mine / "notes.txt").read_text() == "mine"
    steps = sorted(p.name for p in checkpoints.glob("step_*"))
    assert steps == ["step_00000002", "step_00000004"]
    _flip_middle(next((checkpoints / steps[1]).glob("*.distcp")), 64)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping checkpoint of step 4: .* fails verification"):
        assert main(_train(demo_data, run_dir, "--resume", "auto", "--set", "train.steps=6")) == 0
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # steps 3.. again: resumed from step 2, the last good checkpoint (not from 0, not from the changed step 4)
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, *range(3, 7)]
    assert (mine / "notes.txt").read_text() == "mine"
    steps = sorted(p.name for p in checkpoints.glob("step_*"))
    for name in steps:
        _flip_middle(next((checkpoints / name).glob("*.distcp")), 64)
    capsys.readouterr()
    before = _tree(checkpoints)  # (the run dir's recipe.yaml is the run's business: rewritten at each start)
    with pytest.warns(UserWarning, match="skipping checkpoint of step 6: .* fails verification"):
        err = user_error(capsys, *_train(demo_data, run_dir, "--resume", "auto", "--set", "train.steps=8"))
    assert "no checkpoint under" in err and all(f"step {int(n[5:])}: " in err for n in steps), err
    assert err.count("does not match the sha256") == len(steps) and "left untouched" in err
    assert _tree(checkpoints) == before  # nothing retired, pruned, overwritten or restarted from 0
