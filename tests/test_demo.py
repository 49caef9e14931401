"""The demo run (`make demo`'s recipe) learns: its last 20 steps average <= 0.6 * ln(vocab), validation loss falls,
and it leaves a committed checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from framework.config.loader import load_recipe
from framework.data import Tokenizer
from framework.run import train

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_learns(demo_data: Path, tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "logging.progress_bar=false"]
    overrides += [f"data.tokenizer={demo_data / 'tokenizer.model'}", f"data.train={demo_data}"]
    overrides.append(f"data.validation={demo_data}")
    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", overrides)
    train(recipe)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    vocab = Tokenizer(demo_data / "tokenizer.model").vocab_size
    assert len(losses) == recipe.train.steps
    last20 = sum(losses[-20:]) / 20
    assert last20 <= 0.6 * math.log(vocab), (last20, 0.6 * math.log(vocab))
    assert len(val) >= 2 and val[-1] < val[0]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "checkpoints" / latest / "COMPLETE").exists()
