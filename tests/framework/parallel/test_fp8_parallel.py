"""fp8 (torchao Float8Linear, emulated on CPU) converted before TP / SP / PP / FSDP2, as `loom train --nproc N`
builds it, tracks one fp8 process.

Measured (3-block tiny decoder, the middle block in fp8, 3 AdamW steps, gloo, 2 processes): loss relative to one
fp8 process <= 1.5e-5 (FSDP2: bf16 parameters under MixedPrecisionPolicy where one process autocasts), <= 1.3e-5
(TP2, and TP2 + sequence parallel: bitwise the same losses as TP2 — with two ranks the reduce-scatter sums the
same two partials as the all-reduce) and 0.0 (PP2, stages [2, 1]: the same arithmetic as one process); relative
to one bf16 process the same layouts drift 4-5x more over the 3 steps (e.g. sums 1.4e-4 and 1.1e-4 against 2.8e-5
and 2.6e-5), so the layout runs fp8, not bf16. Tolerance 1e-3 per step; the sum of the differences to fp8 must be
under half that to bf16. ~4 s per layout once the pool is up (~15 s for the file standalone)"""

from __future__ import annotations

import pytest

pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is not installed")

MIDDLE = [f"layers.1.{m}" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")] + [
    f"layers.1.feed_forward.{w}" for w in ("w1", "w2", "w3")
]


LAYOUTS = [
    {"data_parallel": "fsdp"},
    {"tp": 2},
    {"tp": 2, "sequence_parallel": True},
    {"pp": 2, "pp_layers": [2, 1]},
]


@pytest.mark.parametrize("parallel", LAYOUTS, ids=["fsdp2", "tp2", "tp2_sp", "pp2"])
def test_fp8_under_a_layout_tracks_one_fp8_process(dist_pool, parallel) -> None:
    results = dist_pool(2).run("dist_cases_fp8:fp8_tracks_one_process", parallel)
    # A pipeline stage holds (and converts) only its own blocks: the union over ranks is the middle block.
    converted = {name for r in results for name in r["converted"]}
    assert sorted(converted) == sorted(MIDDLE), results
    for r in results:
        print(parallel, r)
        assert max(r["loss_rel"]) <= 1e-3, r
        assert sum(r["loss_rel"]) < sum(r["bf16_rel"]) / 2, r
