"""`loom train --nproc 2` with parallel.engine: deepspeed (ZeRO-2) on the demo corpus logs the losses of one native
process, step for step (the recipe, data order, model and optimizer are the same; only the engine differs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

from launcher.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.kv_heads": 2, "model.ffn_hidden": 64,
        "train.steps": 4, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.eval_every": 0,
        "train.device": "cpu", "data.validation": "null", "data.verify": "size", "checkpoint.every": 0,
        "checkpoint.save_final": "false", "logging.progress_bar": "false", "logging.tensorboard": "false"}  # fmt: skip


def _train(run_dir: Path, data: Path, *extra: str) -> list[float]:
    sets = TINY | {"data.tokenizer": data / "tokenizer.model", "data.train": data, "logging.run_dir": run_dir}
    argv = [
        "train",
        str(ROOT / "recipes/debug.yaml"),
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
    ]
    assert main([*argv, *extra]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_loom_train_on_deepspeed_matches_the_native_engine(demo_data: Path, tmp_path: Path) -> None:
    native = _train(tmp_path / "native", demo_data)
    ds = _train(tmp_path / "ds", demo_data, "--nproc", "2", "--set", "parallel.engine=deepspeed",
                "--set", "deepspeed.zero_stage=2")  # fmt: skip
    assert len(ds) == len(native) == 4
    assert max(abs(a - b) / b for a, b in zip(ds, native, strict=True)) <= 1e-5, (ds, native)
    assert "engine: deepspeed" in (tmp_path / "ds" / "recipe.yaml").read_text()
