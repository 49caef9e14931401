"""ParallelDims: every layout rule is a ConfigError raised before any process-group work (no processes here)."""

from __future__ import annotations

from typing import Any

import pytest

from framework.config import ConfigError, ModelConfig, ParallelConfig, Recipe, TrainConfig
from framework.config.schema import MoEConfig
from framework.parallel.dims import MESH_DIMS, ParallelDims


def recipe(family: str = "decoder", gbs: int = 48, mbs: int = 12, **parallel: Any) -> Recipe:
    model = ModelConfig(family=family, n_layers=4, n_heads=4, kv_heads=2, ffn_hidden=64, d_model=32)
    r = Recipe(model=model, parallel=ParallelConfig(**parallel), train=TrainConfig(global_batch_size=gbs))
    r.train.micro_batch_size = mbs
    r.data.seq_len = 16
    return r


def dims(world: int, **kwargs: Any) -> ParallelDims:
    return ParallelDims.from_recipe(recipe(**kwargs), world)


def test_dp_shard_fills_the_world() -> None:
    d = dims(8, tp=2)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp) == (1, 1, 4, 1, 2)
    assert d.dp == 4 and not d.sequence_parallel
    assert tuple(d.sizes()) == MESH_DIMS


def test_single_process_is_all_ones() -> None:
    d = dims(1)
    assert d.sizes() == dict.fromkeys(MESH_DIMS, 1)
    assert "single process" in d.describe()


def test_ddp_puts_data_ranks_in_dp_replicate() -> None:
    d = dims(2, data_parallel="ddp")
    assert (d.dp_replicate, d.dp_shard) == (2, 1)


def test_hsdp_uses_both_dp_dims() -> None:
    d = dims(4, data_parallel="hsdp", dp_replicate=2)
    assert (d.dp_replicate, d.dp_shard, d.dp) == (2, 2, 4)
    assert "dp_replicate 2 x dp_shard 2" in d.describe()


@pytest.mark.parametrize(
    ("world", "kwargs", "key"),
    [
        (4, {"dp_shard": 3}, "parallel"),  # product 3 != 4
        (6, {"tp": 4}, "parallel"),  # 4 does not divide 6
        (4, {"data_parallel": "fsdp", "dp_replicate": 2}, "parallel.dp_replicate"),
        (4, {"data_parallel": "ddp", "dp_replicate": 2, "dp_shard": 2}, "parallel.dp_shard"),
    ],
)
def test_product_must_be_the_world_size(world: int, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        dims(world, **kwargs)
    assert err.value.key == key


def test_heads_and_kv_heads_divisible_by_tp() -> None:
    with pytest.raises(ConfigError, match="model.kv_heads"):
        dims(4, tp=4)  # n_heads 4 ok, kv_heads 2 not
    r = recipe(tp=8)
    with pytest.raises(ConfigError, match="model.n_heads"):
        ParallelDims.from_recipe(r, 8)


def test_sequence_divisible_by_tp_only_with_sequence_parallel() -> None:
    r = recipe(tp=2, sequence_parallel=True)
    r.data.seq_len = 15
    with pytest.raises(ConfigError, match="data.seq_len.*sequence parallel"):
        ParallelDims.from_recipe(r, 2)
    r.parallel.sequence_parallel = False
    assert ParallelDims.from_recipe(r, 2).tp == 2


def test_sequence_parallel_needs_tp() -> None:
    assert dims(2, tp=2, sequence_parallel=True).sequence_parallel
    assert not dims(1, sequence_parallel=True).sequence_parallel  # meaningless without tp: ignored


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("position", "relative_bias"),
        ("moe", MoEConfig(n_experts=4, top_k=2, expert_hidden=16)),
        ("tie_embeddings", True),
    ],
)
def test_tp_accepts_relative_bias_moe_and_tied_heads(key: str, value: object) -> None:
    r = recipe(tp=2, sequence_parallel=True)
    setattr(r.model, key, value)
    assert ParallelDims.from_recipe(r, 2).tp == 2


def test_layers_split_across_pipeline_stages() -> None:
    assert dims(2, pp=2).pp_stages == 2
    assert dims(2, pp=2, pp_schedule="interleaved_1f1b").pp_stages == 4
    with pytest.raises(ConfigError, match="model.n_layers"):
        dims(3, pp=3)
    with pytest.raises(ConfigError, match="model.n_layers"):
        dims(4, pp=4, pp_schedule="zero_bubble")  # 8 stages for 4 blocks


def test_explicit_stage_list() -> None:
    assert dims(3, pp=3, pp_layers=[2, 1, 1]).pp == 3
    for bad in ([2, 2, 1], [2, 2], [4, 0, 0]):
        with pytest.raises(ConfigError, match="parallel.pp_layers"):
            dims(3, pp=3, pp_layers=bad)


def test_global_batch_divisible_by_dp_times_micro_batch() -> None:
    assert dims(4, gbs=8, mbs=2).dp == 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        dims(4, gbs=8, mbs=4)  # 4 ranks x 4 > 8
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        dims(3, gbs=8)


def test_micro_batch_splits_into_pipeline_micro_batches() -> None:
    assert dims(2, pp=2, mbs=2, gbs=8).pp == 2
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        dims(2, pp=2, mbs=3, gbs=9)


@pytest.mark.parametrize(
    ("family", "kwargs", "ok"),
    [
        ("decoder", {"pp": 2}, True),
        ("decoder", {"tp": 2}, True),
        ("encoder", {"tp": 2}, True),
        ("encoder", {"data_parallel": "hsdp", "dp_replicate": 2}, True),
        ("encoder", {"pp": 2}, False),
        ("encoder_decoder", {"tp": 2}, True),
        ("encoder_decoder", {"data_parallel": "ddp"}, True),
        ("encoder_decoder", {"pp": 2}, False),
    ],
)
def test_support_matrix(family: str, kwargs: dict[str, Any], ok: bool) -> None:
    world = 4 if kwargs.get("dp_replicate") else 2
    if ok:
        assert dims(world, family=family, **kwargs).world_size == world
    else:
        with pytest.raises(ConfigError, match=f"family {family} does not support pp"):
            dims(world, family=family, **kwargs)


@pytest.mark.parametrize(
    ("world", "kwargs"),
    [
        (2, {"pp": 2}),
        (2, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2}),
        (4, {"pp": 2, "ep": 2}),
        (8, {"pp": 2, "cp": 2, "tp": 2, "ep": 2}),
    ],
)
def test_moe_composes_with_pipeline_and_expert_parallel_over_cp(world: int, kwargs: dict[str, Any]) -> None:
    """Pipelines add each stage's router losses in its own backward (framework/engines/moe_pipeline.py); ep ranks
    are carved from dp_shard x cp. MoE with cp refuses token dropping only (test_context_parallel.py)."""
    r = recipe(gbs=8, mbs=2, **kwargs)
    r.model.kv_heads = 4  # cp x tp = 4 splits the heads
    r.model.moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=16, aux_loss_scope="global_batch")
    d = ParallelDims.from_recipe(r, world)
    assert (d.pp, d.cp, d.ep) == (kwargs["pp"], kwargs.get("cp", 1), kwargs.get("ep", 1))


# ------------------------------------------------------------------------------------------ ring attention
def test_ring_lifts_the_head_limit_of_ulysses() -> None:
    """kv_heads 2: Ulysses stops at cp 2; a ring (or a hybrid whose Ulysses factor divides the heads) goes on."""
    with pytest.raises(ConfigError) as err:
        dims(4, cp=4)
    assert err.value.key == "model.kv_heads" and "cp_ring" in err.value.fix
    ring = dims(4, cp=4, cp_ring=4)
    assert (ring.cp_ring, ring.cp_ulysses) == (4, 1)
    hybrid = dims(4, cp=4, cp_ring=2)
    assert (hybrid.cp_ring, hybrid.cp_ulysses) == (2, 2)
    assert "(cp = ulysses 2 x ring 2, zigzag)" in hybrid.describe()


@pytest.mark.parametrize(
    ("model", "parallel", "key"),
    [
        ({"attention_dropout": 0.1}, {}, "model.attention_dropout"),
        ({}, {"cp_ulysses": 1}, "parallel.cp_ulysses"),  # 1 x 2 != cp 4
        ({}, {"cp_ring": 3}, "parallel.cp_ring"),
    ],
)
def test_ring_refusals_name_the_field(model: dict[str, Any], parallel: dict[str, Any], key: str) -> None:
    r = recipe(cp=4, **({"cp_ring": 2} | parallel))
    for name, value in model.items():
        setattr(r.model, name, value)
    with pytest.raises(ConfigError) as err:
        r.validate()
        ParallelDims.from_recipe(r, 4)
    assert err.value.key == key and err.value.fix


def test_a_zigzag_ring_needs_two_chunks_per_rank() -> None:
    r = recipe(cp=4, cp_ring=4)
    r.data.seq_len = 20  # divisible by cp 4, not by the 8 zigzag chunks
    with pytest.raises(ConfigError, match="zigzag"):
        ParallelDims.from_recipe(r, 4)
    r.parallel.cp_load_balance = False
    assert ParallelDims.from_recipe(r, 4).cp_ring == 4
