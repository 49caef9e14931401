"""An MoE version of the demo learns like the dense demo, and its router keeps every expert busy.

The debug recipe with every feed-forward replaced by 8 SwiGLU experts of half the dense width, top-2 (so the active
FFN width equals the dense demo's 512), Mixtral-style routing with the Switch load-balancing loss. Asserted: the
last 20 steps average <= 0.6 * ln(vocab), validation loss falls, and over the last 20 logged steps every expert of
every MoE layer gets >= 25% of that layer's mean load (from metrics.jsonl).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from framework.config.loader import load_recipe
from framework.data import Tokenizer
from framework.run import train

ROOT = Path(__file__).resolve().parents[1]
# 250 steps with the load-balancing loss at 0.02 (measured: last-20 loss 4.87 against the 4.99 asserted, the least
# used expert at 0.62 of its layer's mean load). With 0.01 the router did not balance in fewer than the recipe's 400
# steps (least used expert 0.236 of the mean at 300 steps); with 0.05, 200 steps learned too little (5.20).
STEPS = 250

MOE = "{n_experts: 8, top_k: 2, expert_hidden: 256, router: softmax, aux_loss: 0.02, z_loss: 0.001}"


def test_moe_demo_learns_and_balances(demo_data: Path, tmp_path: Path) -> None:
    overrides = [f"logging.run_dir={tmp_path}", "logging.progress_bar=false", "logging.tensorboard=false"]
    overrides += [f"data.tokenizer={demo_data / 'tokenizer.model'}", f"data.train={demo_data}"]
    overrides += [f"data.validation={demo_data}", f"model.moe={MOE}"]
    overrides += [f"train.steps={STEPS}", "train.eval_every=125", "train.eval_batches=4"]
    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", overrides)
    train(recipe)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    losses = [r["loss"] for r in train_rows]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    vocab = Tokenizer(demo_data / "tokenizer.model").vocab_size
    assert len(losses) == STEPS
    last20 = sum(losses[-20:]) / 20
    assert last20 <= 0.6 * math.log(vocab), (last20, 0.6 * math.log(vocab))
    assert len(val) >= 2 and val[-1] < val[0]

    loads = [r["moe_tokens_per_expert"] for r in train_rows[-20:]]  # [step][layer][expert]
    for layer in range(len(loads[0])):
        per_expert = [sum(step[layer][e] for step in loads) for e in range(8)]
        mean = sum(per_expert) / len(per_expert)
        assert min(per_expert) >= 0.25 * mean, (layer, per_expert)
    assert all(r["moe_aux_loss"] is not None and r["moe_dropped_fraction"] == 0.0 for r in train_rows)
