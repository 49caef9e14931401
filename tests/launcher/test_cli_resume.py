"""`loom train --resume` with a checkpoint that cannot be loaded: one line on stderr, exit status 2, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _argv(run_dir: Path, data: Path, d_model: int, *extra: str) -> list[str]:
    sets = {
        "model.d_model": d_model,
        "model.n_layers": 1,
        "model.n_heads": 4,
        "model.kv_heads": 2,
        "model.ffn_hidden": 64,
        "data.tokenizer": data / "tokenizer.model",
        "data.train": data,
        "data.validation": "null",
        "data.verify": "size",
        "train.steps": 1,
        "train.global_batch_size": 2,
        "train.micro_batch_size": 2,
        "train.device": "cpu",
        "logging.run_dir": run_dir,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    return [
        "train",
        str(ROOT / "recipes/debug.yaml"),
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        *extra,
    ]


def test_resume_of_another_model_shape_is_one_line(
    demo_data, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tmp_path / "a", demo_data, 32)) == 0
    checkpoint = tmp_path / "a" / "checkpoints"
    before = sorted(p.name for p in checkpoint.iterdir())
    capsys.readouterr()
    assert main(_argv(tmp_path / "b", demo_data, 48, "--resume", str(checkpoint))) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "holds another model" in err
        and "[32, 32] in the checkpoint, [48, 48] in the model" in err
    ), err
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # the checkpoint is untouched


def test_resume_of_a_truncated_checkpoint_is_one_line(demo_data, tmp_path, capsys) -> None:
    assert main(_argv(tmp_path / "a", demo_data, 32)) == 0
    step = tmp_path / "a" / "checkpoints" / "step_00000001"
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    capsys.readouterr()
    assert main(_argv(tmp_path / "b", demo_data, 32, "--resume", str(step))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "truncated" in err, err
