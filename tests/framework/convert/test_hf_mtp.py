"""Multi-token prediction depths and Hugging Face checkpoints (framework/convert/hf/mtp.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from framework.checkpoint import get_rng_state, save_checkpoint
from framework.config.loader import recipe_to_dict
from framework.config.schema import MTPConfig, Recipe
from framework.convert.command import convert
from framework.convert.hf import llama
from framework.convert.hf.mapping import from_hf_state, to_hf_state
from framework.convert.hf.mtp import depth_in_state, is_shared_copy, mtp_config_fields, mtp_renames
from framework.train import TrainModule
from tests.framework.convert.conftest import CONFIGS, SEQ, VOCAB, random_model

CFG = dataclasses.replace(CONFIGS["llama"], mtp=MTPConfig(depth=2))


def test_depths_map_onto_the_layers_after_the_main_stack_and_back() -> None:
    state = random_model(CFG).state_dict()
    renames = llama.renames(CFG) + mtp_renames(CFG, llama.block)
    hf = to_hf_state(renames, state)  # every Loom tensor used exactly once
    # depth k (0-based) is HF layer n_layers + k = 2 + k, its block named as that layer of the family
    assert torch.equal(hf["model.layers.2.eh_proj.weight"], state["mtp.0.eh_proj.weight"])
    assert torch.equal(hf["model.layers.3.shared_head.norm.weight"], state["mtp.1.norm.weight"])
    assert torch.equal(hf["model.layers.3.enorm.weight"], state["mtp.1.enorm.weight"])
    assert torch.equal(hf["model.layers.2.hnorm.weight"], state["mtp.0.hnorm.weight"])
    assert torch.equal(
        hf["model.layers.3.post_attention_layernorm.weight"], state["mtp.1.block.ffn_norm.weight"]
    )
    assert torch.equal(hf["model.layers.2.mlp.down_proj.weight"], state["mtp.0.block.feed_forward.w2.weight"])
    # q_proj is permuted (RoPE halves) exactly as a main layer's
    main = to_hf_state(llama.renames(dataclasses.replace(CFG, mtp=None, n_layers=3)), _as_layer(state, 2))
    assert torch.equal(
        hf["model.layers.2.self_attn.q_proj.weight"], main["model.layers.2.self_attn.q_proj.weight"]
    )
    # the per-depth copies of the shared embedding and head are accepted and ignored
    hf["model.layers.2.embed_tokens.weight"] = hf["model.embed_tokens.weight"]
    back = from_hf_state(renames, hf, lambda name: is_shared_copy(CFG, name))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert depth_in_state(hf, CFG.n_layers) == 2


def _as_layer(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The main layers plus depth 0's block as main layer i (mtp tensors dropped)."""
    out = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    out |= {
        f"layers.{i}." + k[len("mtp.0.block.") :]: v for k, v in state.items() if k.startswith("mtp.0.block.")
    }
    return out


def test_config_fields_read_either_name() -> None:
    class Hf:
        num_nextn_predict_layers = 1

    class Other:
        num_mtp_layers = 3

    assert mtp_config_fields(Hf())["mtp"].depth == 1
    assert mtp_config_fields(Other())["mtp"].depth == 3
    assert mtp_config_fields(object()) == {}


def test_export_drops_the_depths_and_says_so(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = random_model(CFG)
    recipe = Recipe(model=CFG)
    recipe.data.seq_len = SEQ
    module = TrainModule(model, recipe, torch.device("cpu"))
    meta = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
            "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    save_checkpoint(tmp_path / "ckpt", 0, module.state_dict(), meta)
    line = convert(str(tmp_path / "ckpt"), str(tmp_path / "hf"), to="hf", with_tokenizer=False)
    assert "without the 2 multi-token prediction depth(s)" in line
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
