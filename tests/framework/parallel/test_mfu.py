"""Per-GPU throughput of whole runs (framework.run on the demo corpus) against a hand computation.

A step trains global_batch_size x seq_len tokens; each of the world's devices does 1/world of the model FLOPs, so
per device: tokens/s = global tokens / world / step time, TFLOP/s = flops_per_token x that, MFU = TFLOP/s / peak.
tp and pp peers all count the same tokens while each computes part of the model: before per-GPU accounting their
MFU came out tp x pp too high."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_cases_resume import SEQ, resume_recipe

from framework.models.flops import flops_per_token

PEAK = 1e-3  # TFLOP/s: logging.peak_tflops, so a CPU run reports an MFU

LAYOUTS = {
    "dp2": (2, {"data_parallel": "ddp", "dp_replicate": 2}),  # the control: every rank counts its own tokens
    "tp2": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
    "tp2xpp2": (4, {"tp": 2, "pp": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mfu_is_per_gpu(dist_pool, tmp_path: Path, demo_data: Path, layout: str) -> None:
    world, parallel = LAYOUTS[layout]
    recipe = resume_recipe(tmp_path / "run", demo_data, steps=2, every=0, **parallel)
    recipe.logging.log_every, recipe.logging.peak_tflops = 1, PEAK
    dist_pool(world).run("dist_cases_resume:run_here", recipe)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    fpt = flops_per_token(recipe.model, SEQ, training=True)
    for record in records:
        tokens_per_s = recipe.train.global_batch_size * SEQ / world / record["step_time"]
        assert record["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-9)
        assert record["tflops"] == pytest.approx(fpt * tokens_per_s / 1e12, rel=1e-9)
        assert record["mfu"] == pytest.approx(fpt * tokens_per_s / 1e12 / PEAK, rel=1e-9)
