"""Every shipped recipe loads, and its parameter count equals the same architecture built by `transformers`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.config.errors import ConfigError
from framework.config.loader import load_recipe
from framework.config.schema import MoEConfig
from framework.convert.hf.configs import build_hf_model, check_representable
from framework.models import build_model

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))

# Recipes no `transformers` family represents, and the fields the refusal must name (none at present: every
# shipped recipe has a Hugging Face family).
NO_HF_FAMILY: dict[str, tuple[str, ...]] = {}


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters are counted once


def test_the_zoo_is_shipped() -> None:
    names = {p.stem for p in RECIPES}
    assert {
        "debug",
        "llama-125m",
        "llama-125m-muon",
        "llama-1b",
        "llama-8b",
        "mistral-7b",
        "qwen3-0.6b",
    } <= names
    assert {"bert-base", "t5-base", "alibi-560m"} <= names
    assert {"mixtral-8x7b", "qwen3-moe-30b-a3b", "deepseek-v3-style-16b", "glm-4.5-air-style"} <= names
    assert {
        "qwen3-next-style",
        "mamba2-hybrid-style",
        "gemma3-style",
        "gpt-oss-20b",
        "deepseek-v3-671b",
        "llama-8b-128k",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_parameter_count_matches_transformers(path: Path) -> None:
    recipe = load_recipe(path)
    if path.stem in NO_HF_FAMILY:
        # The oracle does not apply: assert the refusal names exactly why, then report the skip.
        with pytest.raises(ConfigError) as refusal:
            check_representable(recipe.model)
        missing = [f for f in NO_HF_FAMILY[path.stem] if f + "=" not in refusal.value.rule]
        assert not missing, (missing, refusal.value.rule)
        pytest.skip(f"no Hugging Face family (refused: {refusal.value.rule})")
    with torch.device("meta"):
        ours = build_model(recipe.model)
        reference = build_hf_model(recipe.model)
    # transformers' causal-LM classes have no multi-token-prediction depths (an export drops model.mtp)
    mtp = sum(p.numel() for name, p in ours.named_parameters() if name.startswith("mtp."))
    assert (recipe.model.mtp is None) == (mtp == 0)
    assert numel(ours) - mtp == numel(reference)


def size_overrides(recipe_path: Path, data_dir: Path, run_dir: Path) -> list[str]:
    """Shrink sizes only (layers, width, heads, vocab, batch, length); the architecture stays the recipe's."""
    from framework.data import Tokenizer

    recipe = load_recipe(recipe_path)
    vocab = Tokenizer(data_dir / "tokenizer.model").vocab_size
    sets = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.ffn_hidden=96"]
    sets += [f"model.vocab_size={vocab}", "data.seq_len=64", "train.steps=2"]
    sets += ["train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_batches=1"]
    if recipe.model.kv_heads is not None:
        sets.append("model.kv_heads=2")
    if recipe.model.head_dim is not None:
        sets.append("model.head_dim=8")
    if recipe.model.n_decoder_layers is not None:
        sets.append("model.n_decoder_layers=2")
    if recipe.model.full_attention_layers is not None:
        sets.append("model.full_attention_layers=[1]")  # of the 2 blocks left
    if recipe.model.moe is not None:
        sets += moe_size_overrides(recipe.model.moe)
    if recipe.model.layers is not None:
        sets[0] = f"model.n_layers={max(2, len(set(recipe.model.layers.pattern)))}"
        sets += mixer_size_overrides(recipe.model.layers.pattern)
    if recipe.model.layers is not None and recipe.model.layers.local_window is not None:
        sets.append("model.layers.local_window=16")  # shorter than data.seq_len, so local masks still bind
    sets += [f"data.tokenizer={data_dir / 'tokenizer.model'}", f"data.train={data_dir}"]
    sets += [
        f"data.validation={data_dir}",
        f"logging.run_dir={run_dir}",
        "logging.progress_bar=false",
    ]
    return sets


def mixer_size_overrides(pattern: list[str]) -> list[str]:
    """Each mixer of the recipe's pattern once, in order of first use, one block each (Gemma 3: a local then a
    global block; Qwen3-Next: gdn then attention), so every mixer of a hybrid trains; Mamba-2 mixers of 4 heads
    x 16 (expand 1 of d_model 64), state 16, chunk 16 (several chunks of the 64 tokens); GDN of 4 value heads
    over 2 key heads of 8."""
    kinds = list(dict.fromkeys(pattern))
    sets = [f"model.layers.pattern=[{','.join(kinds)}]"]
    if "gdn" in kinds:
        sets += ["model.gdn.heads=4", "model.gdn.key_heads=2", "model.gdn.key_head_dim=8"]
        sets += ["model.gdn.value_head_dim=8"]
    if "mla" in kinds:  # odd latent widths; the query latent only where the recipe has one
        sets += ["model.mla.kv_lora_rank=12", "model.mla.qk_nope_head_dim=6", "model.mla.qk_rope_head_dim=4"]
        sets += ["model.mla.v_head_dim=5"]
    if "mamba2" in kinds:
        sets += ["model.mamba2.heads=4", "model.mamba2.head_dim=16", "model.mamba2.state_dim=16"]
        sets += ["model.mamba2.groups=1", "model.mamba2.chunk_size=16"]
    return sets


def moe_size_overrides(moe: MoEConfig) -> list[str]:
    """At most 8 experts of width 32, top-2, 4 groups choosing 2 when the recipe groups experts."""
    sets = ["model.moe.expert_hidden=32", f"model.moe.n_experts={min(moe.n_experts, 8)}"]
    sets.append(f"model.moe.top_k={min(moe.top_k, 2)}")
    if moe.n_groups > 1:
        sets += ["model.moe.n_groups=4", "model.moe.topk_groups=2"]
    if moe.first_dense > 1:  # DeepSeek-V3's 3 dense layers: one, so one of the 2 blocks left is MoE
        sets.append("model.moe.first_dense=1")
    if moe.shared_expert_hidden is not None:
        sets.append("model.moe.shared_expert_hidden=24")
    return sets


def test_deepseek_v3_671b_is_671b_with_37b_active(capsys: pytest.CaptureFixture[str]) -> None:
    """`loom check` of the DeepSeek-V3 shape reports its published size (the MTP module counted apart)."""
    from launcher.cli import main

    assert main(["check", str(RECIPES[0].parent / "deepseek-v3-671b.yaml")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("parameters: "))
    assert line.startswith("parameters: total 671,0") and "(671.03G), active 37,5" in line, line


def test_llama_8b_128k_fits_80gb_per_rank_on_4_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    """`loom check` lays out 131,072 tokens per sequence on 4 x 8 GPUs as Ulysses 8 x ring 2 with FSDP2 over all
    32 ranks, and the per-rank estimate (8,192 tokens a rank) fits an H100-80GB."""
    from launcher.cli import main

    assert main(["check", str(RECIPES[0].parent / "llama-8b-128k.yaml")]) == 0
    out = capsys.readouterr().out
    assert "world 32 = dp_shard 2 x cp 16 x (cp = ulysses 8 x ring 2, zigzag)" in out, out
    fit = next(x for x in out.splitlines() if x.startswith("memory fit on launch.gpu: "))
    assert fit.startswith("memory fit on launch.gpu: fits H100-80GB"), fit
    assert "micro-batch 1 x 131072" in out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_shrunk_copy_trains_two_steps(path: Path, demo_data: Path, tmp_path: Path) -> None:
    import math

    from framework.run import train

    recipe = load_recipe(path, size_overrides(path, demo_data, tmp_path))
    metrics = train(recipe)
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]) and not metrics["skipped"]
    assert (tmp_path / "checkpoints" / "latest").exists()


def test_one_process_says_it_ignores_a_cluster_layout(demo_data: Path, tmp_path: Path) -> None:
    from framework.run import train

    path = RECIPES[0].parent / "debug.yaml"
    recipe = load_recipe(path, [*size_overrides(path, demo_data, tmp_path), "parallel.tp=2", "train.steps=1"])
    with pytest.warns(UserWarning, match=r"parallel\.tp=2 not applied"):
        train(recipe)
