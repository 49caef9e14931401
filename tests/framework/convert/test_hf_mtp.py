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


def test_depth_matches_transformers_mtp_model_on_glm4_moe() -> None:
    """transformers' MtpModel (the oracle) on a tiny GLM-4.5 (Glm4Moe, num_mtp_layers 1), its MTP layer holding
    Loom's depth-1 weights copied by hand through mtp_renames: given the same h^0 (Loom's main stack output after
    its final norm) and the ids shifted by one, the depth's logits agree (fp32, <= 1e-4)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_layers import MtpModel

    from framework.config.schema import ModelConfig, MoEConfig
    from framework.convert.hf import experts
    from framework.train.mtp_loss import take_mtp_logits

    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=24, n_shared_experts=1, router="sigmoid",
                    route_scale=1.5, first_dense=1, aux_loss=0.0)  # fmt: skip
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, kv_heads=2, head_dim=12, ffn_hidden=72,
                      max_seq_len=64, norm_eps=1e-6, moe=moe, mtp=MTPConfig(depth=1))  # fmt: skip
    hf_cfg = transformers.Glm4MoeConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
        first_k_dense_replace=1, rms_norm_eps=1e-6, attention_bias=False, use_qk_norm=False, num_mtp_layers=1,
        max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
    )  # fmt: skip
    model = random_model(cfg)
    main = transformers.Glm4MoeForCausalLM(hf_cfg).eval()
    oracle = MtpModel(main, 1).eval()

    def ffn(c: ModelConfig, i: int) -> list:
        src, dst = f"layers.{i}.feed_forward.shared_experts.", f"model.layers.{i}.mlp.shared_experts."
        names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        shared = [mapping_copy(f"{src}{a}.weight", f"{dst}{b}.weight") for a, b in names.items()]
        return experts.moe_renames(i, f"model.layers.{i}.") + shared

    from framework.convert.hf.mapping import copy as mapping_copy

    state = model.state_dict()
    mtp_state = {k: v for k, v in state.items() if k.startswith("mtp.")}
    hf = to_hf_state(mtp_renames(cfg, lambda c, i: llama.block(c, i, ffn)), mtp_state)
    # the per-expert file layout covers the MTP layer (HF layer 2) like a main MoE layer
    files = experts.FileLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
    split = experts.to_files(hf, files)
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in split
    fused = experts.from_files(split, files, cfg)
    assert fused.keys() == hf.keys() and all(torch.equal(fused[k], hf[k]) for k in hf)
    # MtpModel's names: layers.{k}.mtp_block.* for the block, layers.{k}.* for enorm/hnorm/eh_proj, post_norm
    ours = {}
    for name, tensor in hf.items():
        rest = name.removeprefix("model.layers.2.")
        if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            ours[f"layers.0.{rest}"] = tensor
        elif rest == "shared_head.norm.weight":
            ours["layers.0.post_norm.weight"] = tensor
        else:
            ours[f"layers.0.mtp_block.{rest}"] = tensor
    missing, unexpected = oracle.load_state_dict(ours, strict=False)
    assert not unexpected
    # left as built: the shared embedding and head (set below), the correction bias (zeros, Loom has none)
    assert {m for m in missing if not m.endswith("e_score_correction_bias")} <= {
        "embed_tokens.weight",
        "shared_head.weight",
    }
    with torch.no_grad():
        main.model.embed_tokens.weight.copy_(state["tok_embeddings.weight"])
        main.lm_head.weight.copy_(state["output.weight"])
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model.train()  # dropout 0: only the MTP logits differ from evaluation
    with torch.no_grad():
        model(ids)
        (got,) = take_mtp_logits(model)
        h0 = _main_output(model, ids)
        positions = torch.arange(SEQ)[None].expand(2, -1)
        h1 = oracle.forward_layer(0, h0, positions, None, input_ids=torch.roll(ids, -1, dims=1))
        expected = oracle._project_to_logits(h1)
    assert expected.abs().max() > 0.1  # a real signal, not two zeros
    assert (got - expected).abs().max() <= 1e-4, (got - expected).abs().max()


def _main_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """h^0: the main stack's output after its final norm (a forward hook on the final norm)."""
    seen: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda m, a, out: seen.append(out))
    model.eval()
    model(ids)
    handle.remove()
    return seen[0]
