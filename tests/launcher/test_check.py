"""`loom check` of a recipe laid out for a cluster: its layout on launch.nnodes x nproc_per_node ranks and its memory
per rank against the GPU it names (launch.gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.config.loader import load_recipe
from framework.gpus import gpu_named
from framework.models.memory import memory_per_rank
from launcher.cli import EXIT_USER_ERROR, main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def check(capsys: pytest.CaptureFixture[str], recipe: str, *sets: str) -> tuple[int, str, str]:
    code = main(["check", str(RECIPES / recipe), *(a for s in sets for a in ("--set", s))])
    out, err = capsys.readouterr()
    return code, out, err


def expected_fit(recipe: str, *sets: str) -> tuple[str, str]:
    """(need, limit) as the report prints them, from the memory model and the GPU table directly."""
    loaded = load_recipe(RECIPES / recipe, list(sets))
    need = memory_per_rank(loaded, device="cuda")["total"]
    return f"{need / 2**30:.3f} GiB", f"{gpu_named(loaded.launch.gpu).memory_bytes / 2**30:.3f} GiB"


def test_a_cluster_recipe_reports_its_layout_and_its_fit_on_the_named_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check(capsys, "mixtral-8x7b.yaml")
    assert code == 0, err
    assert "layout on 4 nodes x 8 ranks: world 32 = dp_shard 32 x (ep 8 of dp_shard) (fsdp)" in out
    need, limit = expected_fit("mixtral-8x7b.yaml")
    assert f"memory fit on launch.gpu: fits H100-80GB: {need} of {limit} (" in out
    assert "the estimate per rank of 32" in out


def test_a_gpu_too_small_for_the_layout_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, "llama-8b.yaml", "launch.gpu=L4-24GB")
    assert code == 0, err  # a report, not a refusal
    need, limit = expected_fit("llama-8b.yaml", "launch.gpu=L4-24GB")
    assert f"memory fit on launch.gpu: DOES NOT FIT L4-24GB: {need} of {limit} (" in out


def test_more_ranks_lower_the_memory_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, "llama-8b.yaml", "launch.nnodes=4")
    assert code == 0, err
    assert "world 32 = dp_shard 32 (fsdp)" in out
    assert expected_fit("llama-8b.yaml", "launch.nnodes=4")[0] in out
    four, one = (load_recipe(RECIPES / "llama-8b.yaml", sets) for sets in (["launch.nnodes=4"], []))
    assert memory_per_rank(four, device="cuda")["total"] < memory_per_rank(one, device="cuda")["total"]


def test_a_layout_the_launch_world_cannot_hold_is_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, "deepseek-v3-style-16b.yaml", "launch.nproc_per_node=4")
    assert code == EXIT_USER_ERROR and out == ""
    assert err.startswith("loom: error: parallel.ep = 8") and err.count("\n") == 1


def test_a_one_device_recipe_has_no_cluster_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, "debug.yaml")
    assert code == 0, err
    assert "layout on" not in out and "launch.gpu" not in out


def test_a_hybrid_recipe_lists_its_mixers(capsys: pytest.CaptureFixture[str]) -> None:
    """Blocks per mixer and their token-mixing FLOPs: the 3:1 Qwen3-Next pattern over 48 blocks, the sums of the
    registry's formulas (framework/models/mixers.py) times 3 for training."""
    from framework.models.mixers import MIXERS

    code, out, err = check(capsys, "qwen3-next-style.yaml")
    assert code == 0, err
    cfg = load_recipe(RECIPES / "qwen3-next-style.yaml").model
    gdn = 3 * 36 * MIXERS["gdn"].mixing_flops(cfg, 4096, None) / 1e6
    line = next(line for line in out.splitlines() if line.startswith("mixers: "))
    assert line.startswith(f"mixers: 36 gdn ({gdn:.2f}M), 12 attention ("), line


def test_an_mtp_recipe_reports_its_depths(capsys: pytest.CaptureFixture[str]) -> None:
    """The mtp line: the parameters of the model's `mtp.*` modules (built on the meta device, counted directly)
    and the extra training FLOPs per token against the same recipe without model.mtp."""
    import torch

    from framework.models import build_model
    from framework.models.flops import flops_per_token

    sets = (
        "model.n_layers=2",
        "model.d_model=64",
        "model.n_heads=4",
        "model.ffn_hidden=96",
        "model.mtp={depth: 2}",
    )
    code, out, err = check(capsys, "debug.yaml", *sets)
    assert code == 0, err
    recipe = load_recipe(RECIPES / "debug.yaml", list(sets))
    with torch.device("meta"):
        model = build_model(recipe.model)
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert mtp > 0
    seq = recipe.data.seq_len
    without = load_recipe(RECIPES / "debug.yaml", list(sets[:-1])).model
    extra = (
        flops_per_token(recipe.model, seq, training=True) / flops_per_token(without, seq, training=True) - 1
    )
    line = next(line for line in out.splitlines() if line.startswith("mtp: "))
    assert line.startswith(f"mtp: depth 2, loss weight 0.3; parameters {mtp / 1e3:.2f}K "), (line, mtp)
    assert line.endswith(f"training FLOPs per token +{extra:.1%}"), line
