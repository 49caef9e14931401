"""fp8 (torchao Float8Linear, emulated on CPU) converted before TP / FSDP2, as `loom train --nproc N` builds it,
tracks one fp8 process.

Measured (3-block tiny decoder, the middle block in fp8, 3 AdamW steps, gloo, 2 processes): loss relative to one
fp8 process <= 1.5e-5 (FSDP2: bf16 parameters under MixedPrecisionPolicy where one process autocasts) and
<= 1.3e-5 (TP2); relative to one bf16 process the same layouts drift 4-5x more over the 3 steps (sums 1.4e-4 and
1.1e-4 against 2.8e-5 and 2.6e-5), so the layout runs fp8, not bf16. Tolerance 1e-3 per step; the sum of the
differences to fp8 must be under half that to bf16. Both layouts ~5 s each once the pool is up (~17 s standalone)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is not installed")

MIDDLE = [f"layers.1.{m}" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")] + [
    f"layers.1.feed_forward.{w}" for w in ("w1", "w2", "w3")
]


@pytest.mark.parametrize("parallel", [{"data_parallel": "fsdp"}, {"tp": 2}], ids=["fsdp2", "tp2"])
def test_fp8_under_a_layout_tracks_one_fp8_process(dist_pool, parallel) -> None:
    for r in dist_pool(2).run("dist_cases_fp8:fp8_tracks_one_process", parallel):
        print(parallel, r)
        assert sorted(r["converted"]) == sorted(MIDDLE), r
        assert max(r["loss_rel"]) <= 1e-3, r
        assert sum(r["loss_rel"]) < sum(r["bf16_rel"]) / 2, r
