"""The DeepSpeed engine (parallel.engine: deepspeed) trains like one native process.

ZeRO-1, -2, -3 and -3 with CPU offload of the optimizer and the parameters, 2 and 4 gloo processes, tiny decoder,
fp32, clipping active, 5 AdamW steps: per-step loss and gradient norm against the one-process native engine,
and the parameters after the last update. DeepSpeed reduces gradients itself (averaged over ranks, divided by
the accumulation steps); Loom undoes both factors, so the sums are the same up to rounding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

CASES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero3_offload": (3, True)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_matches_one_native_process(ds_pool, case: str, world: int) -> None:
    stage, offload = CASES[case]
    for r in ds_pool(world).run("dist_cases_deepspeed:zero_parity", stage, offload):
        print(case, r)
        assert r["grad_accumulation"] == 4 // world  # 4 samples = 1 per micro-batch x ranks x accumulated
        assert max(r["loss_rel"]) <= 1e-6, r
        assert max(r["norm_rel"]) <= 1e-5, r
        assert r["param_rel"] <= 5e-5, r
        assert r["partitioned"] == (stage == 3), r


ULYSSES = {"cp2": (2, 2), "cp2_dp2_zero3": (4, 3)}  # (processes, ZeRO stage)


@pytest.mark.parametrize("case", list(ULYSSES))
def test_ulysses_matches_one_native_process(ds_pool, case: str) -> None:
    """parallel.cp = 2 on the DeepSpeed engine: DeepSpeed's DistributedAttention exchanges sequence shards for
    heads (GQA: 4 query, 2 key/value heads; RoPE on global positions; a causal mask over the whole sequence)."""
    world, stage = ULYSSES[case]
    results = ds_pool(world).run("dist_cases_deepspeed:zero_parity", stage, cp=2, model={"kv_heads": 2})
    for r in results:
        print(case, r)
        assert max(r["loss_rel"]) <= 1e-6, r
        assert max(r["norm_rel"]) <= 1e-5, r
        assert r["param_rel"] <= 5e-5, r


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: DeepSpeed's CPU accelerator has no fp16"
)
@pytest.mark.parametrize("scale_init", [65536.0, 2.0**24], ids=["scale_2e16", "overflow_2e24"])
def test_fp16_tracks_the_native_fp16_engine(ds_pool, scale_init: float) -> None:
    """DeepSpeed's fp16 mode (fp16 weights, its loss scaler) against the native fp16 engine: losses close, the
    same steps skipped on overflow while the scale backs off. Written for a GPU session; not run on CPU."""
    for r in ds_pool(2).run("dist_cases_deepspeed:fp16_tracks_native", 2, scale_init):
        print(scale_init, r)
        assert r["weight_dtype"] == "torch.float16", r
        assert max(r["loss_rel"]) <= 1e-2 and r["first_vs_fp32"] <= 1e-2, r
        assert r["skipped"] == r["native_skipped"], r


@pytest.mark.parametrize("case", ["zero1", "zero3", "zero3_offload"])
def test_deepspeed_files_resume_exactly(ds_pool, tmp_path, case: str) -> None:
    """Every stage's partitions (and offloaded optimizer state) saved by DeepSpeed and loaded into a fresh engine
    (weights-only) continue bit for bit; ZeRO-2 is also resumed end to end in test_deepspeed_train.py."""
    stage, offload = CASES[case]
    for r in ds_pool(2).run("dist_cases_deepspeed:zero_resume", stage, offload, str(tmp_path)):
        assert r["resumed"] == r["straight"] and r["step"] == 4, r
