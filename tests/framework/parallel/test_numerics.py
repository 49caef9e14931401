"""Distributed numerics: the dropout RNG scheme, one skip decision for a fault on one rank, fp16 loss scaling and
bf16 parameters under FSDP2, and activation checkpointing's saved tensors (counted).

Measured (tiny 2-block model, gloo, 2 or 4 processes):
- dropout p=0.25: drop rate 0.2486 over 12416 elements (sigma 0.0039); with sequence parallel 0.2578 over 8288
  (sigma 0.0048). With every rank seeded by train.seed (the old scheme) every mask was equal across dp ranks.
- a NaN/inf in one rank's gradient or input: every rank skips, parameters bitwise unchanged, the following steps
  match one process that skipped the same step (loss <= 1.2e-7, parameters <= 2.5e-5). Without the world-wide
  agreement DDP2 and TP2 diverged (rank 1 skipped, rank 0 applied).
- fp16, one rank overflows: every rank skips, scales 1024 -> 512 -> 512 -> 1024 everywhere. Against one fp16
  process: loss <= 2.2e-5 (FSDP2: parameters in fp16 under MixedPrecisionPolicy, where one process autocasts only
  the matmuls), 3.2e-6 (DDP2); parameters <= 2.8e-2 (FSDP2), 2.8e-4 (DDP2). Tolerances: loss 1e-4, params 5e-2.
  A per-rank GradScaler under DDP2 grew to 2048 on one rank while the other backed off to 512.
- bf16 parameters, fp32 reduce (FSDP2) against one fp32 process: loss <= 1.1e-4, parameters <= 7.2e-2 (tolerances
  1e-3 and 0.15: 3 AdamW steps at lr 1e-2 turn bf16 rounding of small gradients into whole steps).
- activation checkpointing, 4 blocks: saved tensors none 182 (397 KB), selective 100 (215 KB), full 18 (33 KB);
  losses bitwise equal; the same counts per rank under FSDP2.
"""

from __future__ import annotations

import math

import pytest
import torch

from framework.parallel.rng import mix_seed, per_rank_rng, seed_for_rank

SEQ = 16  # dist_cases.SEQ

TP2_DP2 = {"tp": 2, "data_parallel": "fsdp"}
P = 0.25


# -- 1. dropout RNG ---------------------------------------------------------------------------------------------


def test_seed_for_rank_without_mesh_is_the_seed_and_mixing_separates_neighbours() -> None:
    assert seed_for_rank(7, None) == 7
    seeds = {mix_seed(s, dp, 0, 0) for s in range(4) for dp in range(4)}
    assert len(seeds) == 16  # seed + rank would collide (seed 1 rank 0 == seed 0 rank 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_per_rank_rng_differs_per_rank_and_leaves_the_default_stream_in_step() -> None:
    """Two tp peers (same default state) draw different numbers inside the fork, the same ones after it."""
    draws = []
    for rank in (0, 1):
        torch.manual_seed(3)
        with per_rank_rng(rank, torch.device("cpu")):
            inside = torch.rand(8)
        draws.append((inside, torch.rand(8)))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert torch.equal(draws[0][1], draws[1][1])


def test_per_rank_rng_covers_sdpa_dropout() -> None:
    """SDPA's dropout takes no generator: it draws from the default one, which the fork replaces."""
    q = torch.randn(1, 2, 8, 4)
    outs = []
    for rank in (0, 1, 0):
        torch.manual_seed(3)
        with per_rank_rng(rank, torch.device("cpu")):
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_rank_rng_forks_the_cuda_generator() -> None:
    """On CUDA, SDPA's dropout draws from the CUDA generator: the fork seeds and restores it too."""
    device = torch.device("cuda")
    q = torch.randn(1, 2, 64, 16, device=device)
    outs, after = [], []
    for rank in (0, 1, 0):
        torch.manual_seed(3)
        with per_rank_rng(rank, device):
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
        after.append(torch.rand(8, device=device))
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2xdp2", "tp2_sp_x_dp2"])
def test_dropout_masks_tp2_x_dp2(dist_pool, sequence_parallel: bool) -> None:
    """Replicated activations (embedding; residual stream without sequence parallel): tp peers drop the same
    elements, dp ranks different ones. Sharded ones (attention probabilities of this rank's heads; the residual
    stream's sequence shard under sequence parallel): different on every rank. Rate within 3 sigma of p."""
    parallel = TP2_DP2 | {"sequence_parallel": sequence_parallel}
    results = dist_pool(4).run("dist_cases_numerics:dropout_masks", parallel, P)
    by = {(r["dp"], r["tp"]): r for r in results}
    assert set(by) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert len({r["seed"] for r in results}) == 2  # one seed per dp rank, shared by its tp peers
    n_calls = len(by[0, 0]["calls"])
    kinds = [kind for kind, _, _ in by[0, 0]["calls"]]
    residual = f"activation of {SEQ // 2 if sequence_parallel else SEQ} tokens"
    assert kinds[0] == f"activation of {SEQ} tokens"  # the embedding dropout: whole sequence, replicated
    assert kinds[1:] == ["attention", residual, residual] * 2  # per block
    replicated = [i == 0 or (kinds[i] == residual and not sequence_parallel) for i in range(len(kinds))]
    dropped = kept_inputs = 0
    for i in range(n_calls):
        mask = {key: r["calls"][i][1] for key, r in by.items()}
        for dp in (0, 1):
            same_tp = torch.equal(mask[dp, 0], mask[dp, 1])
            assert same_tp == replicated[i], (i, kinds[i], dp)
        for tp in (0, 1):
            assert not torch.equal(mask[0, tp], mask[1, tp]), (i, kinds[i], tp)
        for r in results:
            dropped += int(r["calls"][i][1].sum())
            kept_inputs += int(r["calls"][i][2].sum())
    sigma = math.sqrt(P * (1 - P) / kept_inputs)
    rate = dropped / kept_inputs
    print(f"drop rate {rate:.4f} over {kept_inputs} elements, p={P}, sigma={sigma:.4f}")
    assert abs(rate - P) <= 3 * sigma


def test_dropout_recomputed_identically_under_checkpointing_tp2_x_dp2(dist_pool) -> None:
    """Full activation checkpointing recomputes the blocks in backward: the recompute must draw the same masks,
    the per-tp-rank attention stream included, so gradients equal those without checkpointing."""
    for diff in dist_pool(4).run("dist_cases_numerics:dropout_checkpoint_grads", TP2_DP2, P):
        assert diff == 0.0


# -- 2. non-finite skip ---------------------------------------------------------------------------------------

NONFINITE = {
    # DDP: the NaN lands after the all-reduce, in one replica's copy (a fault on one device)
    "ddp2": ({"data_parallel": "ddp"}, "layers.0.attention.wq.weight", math.nan),
    # FSDP2: in rank 1's shard only
    "fsdp2": ({"data_parallel": "fsdp"}, "layers.1.feed_forward.w2.weight", math.inf),
    # TP2: the final norm's weight is replicated over tp (normed on each rank alone)
    "tp2": ({"tp": 2}, "norm.weight", math.nan),
    # a bad input on one rank (NaN in its embedding output): the loss sums carry it to every rank
    "fsdp2_input": ({"data_parallel": "fsdp"}, "input", math.nan),
    "tp2_input": ({"tp": 2}, "input", math.inf),
}


@pytest.mark.parametrize("layout", list(NONFINITE))
def test_nonfinite_on_one_rank_skips_everywhere(dist_pool, layout: str) -> None:
    parallel, param, value = NONFINITE[layout]
    results = dist_pool(2).run("dist_cases_numerics:nonfinite_skip", parallel, param, value)
    for r in results:
        assert r["ref_skipped"] == [False, True, False]
        assert r["skipped"] == [False, True, False], r
        assert r["unchanged"], r
        # a bad input makes the step's loss itself non-finite (on every rank: it is a global sum)
        assert math.isfinite(r["losses"][1]) == (param != "input"), r
        assert max(r["loss_rel"][0], r["loss_rel"][2]) <= 1e-5, r
        assert r["param_rel"] <= 5e-5, r
        print(layout, r["rank"], r["loss_rel"], r["param_rel"])


def test_nonfinite_on_one_rank_skips_everywhere_tp2_x_pp2(dist_pool) -> None:
    """The last stage's final norm is replicated over tp: a NaN in one tp peer's copy must skip the step on all four
    ranks (both stages), not only on that peer and its pipeline partner."""
    results = dist_pool(4).run(
        "dist_cases_numerics:pp_nonfinite", {"tp": 2, "pp": 2}, "norm.weight", math.nan
    )
    assert sum(r["victim"] for r in results) == 1
    for r in results:
        assert r["skipped"] == [False, True, False], r
        assert r["unchanged"], r
        assert max(r["loss_rel"]) <= 1e-5, r


# -- 5. fp16 loss scaling and bf16 parameters under FSDP2 -------------------------------------------------------


@pytest.mark.parametrize(
    "parallel",
    [{"data_parallel": "fsdp"}, {"data_parallel": "ddp"}, {"tp": 2}],
    ids=["fsdp2", "ddp2", "tp2"],
)
def test_fp16_overflow_on_one_rank_backs_off_everywhere(dist_pool, parallel) -> None:
    """One rank's gradient shard overflows: every rank skips, every scale backs off (1024 -> 512), then grows
    after 2 clean steps on every rank (512 -> 1024), and the steps track one fp16 process."""
    results = dist_pool(2).run(
        "dist_cases_numerics:fp16_overflow", parallel, "layers.1.feed_forward.w2.weight"
    )
    for r in results:
        assert r["skipped"] == [False, True, False, False], r
        assert r["unchanged"], r
        assert r["scales"] == r["ref_scales"] == [1024.0, 512.0, 512.0, 1024.0], r
        assert max(r["loss_rel"]) <= 1e-4, r
        assert r["param_rel"] <= 5e-2, r
        print(parallel, r["rank"], "loss_rel", r["loss_rel"], "param_rel", r["param_rel"])


def test_bf16_parameters_fp32_reduce_fsdp2_track_fp32(dist_pool) -> None:
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded (master) parameters and the
    gradients stay fp32, and the losses track one fp32 process loosely (bf16 has 8 bits of mantissa)."""
    for r in dist_pool(2).run(
        "dist_cases_numerics:mixed_precision_tracks", {"data_parallel": "fsdp"}, "bf16"
    ):
        assert r["sharded_dtype"] == "torch.float32" and r["grads_fp32"], r
        assert max(r["loss_rel"]) <= 1e-3, r
        assert r["param_rel"] <= 0.15, r
        print("bf16", r)


# -- 3. activation checkpointing ------------------------------------------------------------------------------


def _check_checkpointing(counts: dict) -> None:
    (n_none, b_none, loss_none), (n_sel, b_sel, loss_sel), (n_full, b_full, loss_full) = (
        counts[m] for m in ("none", "selective", "full")
    )
    assert loss_none == loss_sel == loss_full, counts
    assert n_full < n_sel < n_none, counts
    assert b_full < b_sel < b_none, counts


def test_checkpointing_saves_fewer_tensors_one_process() -> None:
    from dist_cases_numerics import checkpointing_counts

    counts = checkpointing_counts({})
    print(counts)
    _check_checkpointing(counts)


def test_checkpointing_saves_fewer_tensors_fsdp2(dist_pool) -> None:
    for counts in dist_pool(2).run("dist_cases_numerics:checkpointing_counts", {"data_parallel": "fsdp"}):
        print(counts)
        _check_checkpointing(counts)


def test_trainer_seeds_dropout_from_the_train_module() -> None:
    """A fresh fit() seeds torch's generators with train_module.rng_seed (per rank under a mesh), not train.seed."""
    from dist_cases import tiny_recipe

    from framework.run import materialize_model
    from framework.train import Trainer, TrainModule

    recipe = tiny_recipe()
    recipe.train.steps = 0
    module = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    module.rng_seed = 12345
    Trainer(module, [], [], recipe).fit()
    assert torch.initial_seed() == 12345
