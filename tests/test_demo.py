"""The demo run (`make demo`'s recipe, cut to 200 steps) learns: its last 20 steps average
<= 0.655 * ln(vocab), validation loss falls, and it leaves a committed checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

from framework.config.loader import load_recipe
from framework.data import Tokenizer
from framework.run import train

ROOT = Path(__file__).resolve().parents[1]
# Half the recipe's 400 steps (the cosine schedule then decays over 200). Measured last-20 averages at 200
# steps: 5.20, 5.17 and 5.11 nats on three (train.seed, data.seed) pairs; the target 0.655 * ln(4096) = 5.45
# nats leaves ~0.25 nats of margin and is still ~1 nat below the corpus's unigram entropy (6.50 nats): a model
# that only learned token frequencies does not pass, only one that uses its context.
STEPS = 200
TARGET = 0.655


def test_demo_recipe_learns(demo_data: Path, tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "logging.progress_bar=false", f"train.steps={STEPS}"]
    overrides += [f"data.tokenizer={demo_data / 'tokenizer.model'}", f"data.train={demo_data}"]
    overrides.append(f"data.validation={demo_data}")
    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", overrides)
    train(recipe)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    vocab = Tokenizer(demo_data / "tokenizer.model").vocab_size
    assert len(losses) == STEPS
    last20 = sum(losses[-20:]) / 20
    assert last20 <= TARGET * math.log(vocab), (last20, TARGET * math.log(vocab))
    assert len(val) >= 2 and val[-1] < val[0]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "checkpoints" / latest / "COMPLETE").exists()
