"""Pipeline parallelism (torch.distributed.pipelining) trains like one process (fp32, gloo).

Every layout builds its model from the seed by itself, with clipping active and dropout 0, and is compared with a
one-process run in the same worker: per-step loss and gradient norm <= 1e-5 relative, the parameters each rank holds
<= 1e-4 relative per tensor after 5 AdamW steps, parameter names those of the full model, and a held-out batch's
summed loss through the pipeline equal to one process's. Measured: loss <= 1.2e-7, grad norm <= 4.7e-7,
parameters <= 2.7e-6 without TP and <= 2.1e-5 with TP (the MLP's row-parallel sums), evaluation <= 6.1e-8.
"""

from __future__ import annotations

import pytest
import torch

from framework.config import ConfigError, ModelConfig, ParallelConfig, Recipe
from framework.config.schema import MTPConfig
from framework.models import build_model
from framework.parallel.dims import ParallelDims
from framework.parallel.pipeline import split_for_pipeline, stage_blocks, stages_of_rank

STEPS = 5
"""Optimizer steps each layout trains and is compared with one process for (the issue's parity rule)."""

# name: (world size, parallel section, micro-batch size, documents, model overrides)
LAYOUTS = {
    "pp2_1f1b": (2, {"pp": 2, "pp_schedule": "1f1b"}, 2, True, {}),
    "pp2_gpipe": (2, {"pp": 2, "pp_schedule": "gpipe"}, 2, False, {}),
    "pp2_interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}, 4, True, {}),
    "pp2_uneven_full_ac": (
        2,
        {"pp": 2, "pp_layers": [3, 1], "activation_checkpointing": "full"},
        2,
        False,
        {},
    ),
    "pp2_tied": (2, {"pp": 2}, 2, False, {"tie_embeddings": True}),
    # multi-token prediction: its depths on the last stage, which embeds the tokens ahead (untied head)
    "pp2_mtp": (2, {"pp": 2}, 2, True, {"mtp": MTPConfig(depth=2, loss_weight=0.3)}),
    # ... with a rank running two stages (the last one a view), the depth's block under the TP + SP plans
    "tp2_sp_xpp2_mtp_interleaved": (
        4,
        {"pp": 2, "tp": 2, "dp_shard": 1, "sequence_parallel": True, "pp_schedule": "interleaved_1f1b"},
        4,
        False,
        {"mtp": MTPConfig(depth=1, loss_weight=0.5)},
    ),
    "pp4_tied": (4, {"pp": 4}, 4, True, {"tie_embeddings": True}),
    "pp2xfsdp2": (4, {"pp": 2, "dp_shard": 2}, 2, True, {}),
    "pp2xfsdp2_tied_interleaved": (
        4,
        {"pp": 2, "dp_shard": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2},
        2,
        False,
        {"tie_embeddings": True},
    ),
    "pp2xhsdp2": (4, {"pp": 2, "data_parallel": "hsdp", "dp_replicate": 2, "dp_shard": 1}, 2, False, {}),
    "tp2xpp2": (4, {"pp": 2, "tp": 2, "dp_shard": 1}, 2, True, {}),
    # zero bubble (pp2 alone is this layout without tp); TP2 + SP x PP2 interleaved is tp2_sp_xpp2_mtp_interleaved
    "tp2xpp2_zero_bubble": (4, {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "zero_bubble"}, 4, False, {}),
    "tp2_sp_xpp2xfsdp2": (8, {"pp": 2, "tp": 2, "dp_shard": 2, "sequence_parallel": True}, 2, True, {}),
    # ring attention inside pipeline stages (Ulysses x PP: the two cases below)
    "ring2xpp2": (4, {"pp": 2, "cp": 2, "cp_ring": 2, "dp_shard": 1}, 2, True, {}),
    "cp2xpp2_interleaved_tied": (
        4,
        {"pp": 2, "cp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b"},
        4,
        False,
        {"tie_embeddings": True},
    ),
    # 4-D: every dense dimension at once (tp innermost, then cp, then pipeline stages), one head per rank
    "tp2_sp_xcp2xpp2": (
        8,
        {"pp": 2, "cp": 2, "tp": 2, "dp_shard": 1, "sequence_parallel": True},
        2,
        True,
        {},
    ),
}


def check(results: list[dict], world: int, overrides: dict) -> None:
    assert len(results) == world
    for result in results:
        assert result["names_subset"], result
        assert max(result["loss_rel"]) <= 1e-5, result
        assert max(result["norm_rel"]) <= 1e-5, result
        assert result["param_rel"] <= 1e-4, result
        assert result["eval_rel"] <= 1e-5 and result["eval_tokens_equal"], result
        assert result["mtp_keys_equal"] and max(result["mtp_rel"].values(), default=0.0) <= 1e-5, result
    if "mtp" in overrides:
        assert all(r["mtp_rel"] for r in results)  # logged on every rank, pipeline stages included
    # Together the pipeline ranks hold every parameter of the model.
    held = set().union(*(r["names"] for r in results))
    model = build_model(
        ModelConfig(
            vocab_size=64, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64, max_seq_len=16, **overrides
        )
    )
    assert held == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_matches_one_process(dist_pool, layout: str) -> None:
    world, parallel, micro_batch, documents, model = LAYOUTS[layout]
    results = dist_pool(world).run("dist_cases_pp:pp_parity", STEPS, parallel, model, micro_batch, documents)
    check(results, world, model)


def test_stage_blocks_even_and_explicit() -> None:
    assert stage_blocks(4, 2, None) == [[0, 1], [2, 3]]
    assert stage_blocks(4, 2, [3, 1]) == [[0, 1, 2], [3]]
    assert stage_blocks(8, 4, None) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_stage_placement() -> None:
    assert stages_of_rank(1, 2, "1f1b") == [1]
    assert stages_of_rank(0, 2, "interleaved_1f1b") == [0, 2]
    assert stages_of_rank(1, 4, "zero_bubble") == [1, 5]


def _recipe(**parallel) -> Recipe:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64, max_seq_len=16)
    recipe = Recipe(model=cfg, parallel=ParallelConfig(**parallel))
    recipe.train.global_batch_size, recipe.train.micro_batch_size = 8, 4
    return recipe


def test_split_keeps_full_model_names() -> None:
    """Each stage keeps the names the full model gives its modules; the first embeds, the last has the head."""
    recipe = _recipe(pp=2, pp_schedule="interleaved_1f1b")
    dims = ParallelDims.from_recipe(recipe, 2)
    full = {n for n, _ in build_model(recipe.model).named_parameters()}
    names = []
    for pp_rank in (0, 1):
        model = build_model(recipe.model)
        parts = split_for_pipeline(model, dims, recipe, pp_rank)
        assert parts.stage_ids == [pp_rank, pp_rank + 2]
        rank_names = {n for n, _ in model.named_parameters()}
        stage_names = [{n for n, _ in m.named_parameters()} for m in parts.modules]
        assert stage_names[0] | stage_names[1] == rank_names and not stage_names[0] & stage_names[1]
        names.append(rank_names)
    assert names[0] | names[1] == full and not names[0] & names[1]
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[1]
    assert "layers.0.attention.wq.weight" in names[0] and "layers.2.attention.wq.weight" in names[0]


def test_stage_view_forward_matches_model() -> None:
    """Running the stages one after another gives the whole model's logits (the views share the modules)."""
    recipe = _recipe(pp=2, pp_schedule="interleaved_1f1b")
    dims = ParallelDims.from_recipe(recipe, 2)
    torch.manual_seed(0)
    whole = build_model(recipe.model)
    ranks = []
    for pp_rank in (0, 1):
        model = build_model(recipe.model)
        model.load_state_dict(whole.state_dict(), strict=False)
        ranks.append(split_for_pipeline(model, dims, recipe, pp_rank).modules)
    ids = torch.randint(0, 64, (2, 16))
    h = ids
    for stage in (ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]):  # stages 0, 1, 2, 3
        h = stage(h)
    torch.testing.assert_close(h, whole(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "parallel", "key"),
    [
        ({"position": "relative_bias"}, {}, "model.position"),
        ({}, {"data_parallel": "ddp"}, "parallel.data_parallel"),
        ({"n_layers": 3}, {}, "model.n_layers"),
        ({}, {"pp_layers": [4, 0]}, "parallel.pp_layers"),
        ({}, {"pp_schedule": "zero_bubble", "dp_shard": 2}, "parallel.pp_schedule"),
    ],
)
def test_refused_pipeline_layouts(model: dict, parallel: dict, key: str) -> None:
    recipe = _recipe(pp=2, **parallel)
    for name, value in model.items():
        setattr(recipe.model, name, value)
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_recipe(recipe, 4)
    assert err.value.key == key
