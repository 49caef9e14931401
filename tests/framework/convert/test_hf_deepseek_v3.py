"""DeepSeek-V3 (DeepseekV3ForCausalLM) both ways against transformers' own model: MLA blocks of odd widths (5 heads,
kv latent 12, nope 6 / rope 4 / v 5, with and without the query latent, one case with YaRN and mscale_all_dim),
3 layers (the first dense), 6 experts top-3 in 2 groups of which the best 1 is searched, a nonzero selection bias,
weights renormalised and scaled by 2.5, one shared expert. Kimi-K2's config.json (model_type kimi_k2) imports as
the same family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, MLAConfig, ModelConfig, MoEConfig
from framework.convert.hf.configs import build_hf_model, hf_family
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from tests.framework.convert.conftest import VOCAB
from tests.framework.convert.test_hf_glm4_moe import _ids, _logits, _model, _routed

TOL = 1e-4
MLA = MLAConfig(kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
CFG = ModelConfig(
    family="decoder", vocab_size=VOCAB, d_model=40, n_layers=3, n_heads=5, ffn_hidden=36, max_seq_len=64,
    norm_eps=1e-6, rope_theta=5000.0, layers=LayersConfig(pattern=["mla"]), mla=MLA,
    moe=MoEConfig(n_experts=6, top_k=3, expert_hidden=16, n_shared_experts=1, first_dense=1, router="sigmoid",
                  n_groups=2, topk_groups=1, renormalize=True, route_scale=2.5, aux_loss=0.0, expert_bias=True),
)  # fmt: skip
YARN = {"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_original_max_seq_len": 16,
        "rope_yarn_mscale": 1.0, "rope_yarn_mscale_all_dim": 1.0}  # fmt: skip
CASES = {
    "q_lora": CFG,
    "no_q_lora": dataclasses.replace(CFG, mla=dataclasses.replace(MLA, q_lora_rank=None)),
    "yarn": dataclasses.replace(CFG, **YARN),
}


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_decode_and_import_round_trip(case: str, tmp_path: Path) -> None:
    cfg = CASES[case]
    assert hf_family(cfg) == "deepseek_v3"
    model = _model(0, cfg)
    save_hf(cfg, model.state_dict(), tmp_path / "out")
    hf = _load(tmp_path / "out")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = _ids(1, 24)  # 24 > the yarn case's original 16 positions
    ours = _routed(model, ids)
    diff = (ours - _logits(hf, ids)).abs().max().item()
    print(f"deepseek_v3 {case}: export max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1
    prompt = _ids(2, 6)[:1]
    tokens, margins = _routed(model, prompt, decode=True)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=True)  # fmt: skip
    assert torch.equal(tokens, theirs[:, -12:])
    cfg_back, state_back = read_hf(tmp_path / "out")
    assert cfg_back == cfg and state_back.keys() == model.state_dict().keys()
    assert all(torch.equal(state_back[k], t) for k, t in model.state_dict().items())
    save_hf(cfg_back, state_back, tmp_path / "again")
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_import_a_model_transformers_built(tmp_path: Path) -> None:
    """transformers' own random model (its init, its e_score_correction_bias set by hand) imports with equal
    logits."""
    torch.manual_seed(3)
    hf = build_hf_model(CFG).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.weight.normal_(std=0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(std=0.3)
    hf.save_pretrained(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg == CFG
    from framework.models import build_model

    model = build_model(cfg).eval()
    model.load_state_dict(state)
    ids = _ids(4, 20)
    diff = (_routed(model, ids) - _logits(hf, ids)).abs().max().item()
    print(f"deepseek_v3 import: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_kimi_k2_config_imports_as_deepseek_v3(tmp_path: Path) -> None:
    """Moonshot ships Kimi-K2 as model_type kimi_k2 with architectures [DeepseekV3ForCausalLM] (its own
    auto_map code); the weights are DeepSeek-V3's. Loom reads such a folder as deepseek_v3."""
    model = _model(0, CFG)
    save_hf(CFG, model.state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config |= {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, state = read_hf(tmp_path)
    assert cfg == CFG
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())


def test_half_layout_rope_is_refused(tmp_path: Path) -> None:
    save_hf(CFG, _model(0, CFG).state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_interleave": False}))
    with pytest.raises(ConfigError) as err:
        read_hf(tmp_path)
    assert err.value.key == "rope_interleave" and "rope_interleave true" in err.value.fix


def test_mtp_depths_drop_on_export_and_import_from_the_checkpoint_layout(tmp_path: Path) -> None:
    """Export drops model.mtp (DeepseekV3ForCausalLM ignores its layers); a folder holding DeepSeek's MTP layer
    (model.layers.{L}.enorm / hnorm / eh_proj / shared_head.norm + a block) imports it as mtp.0 with its values."""
    from safetensors.torch import save_file

    from framework.config.schema import MTPConfig
    from framework.convert.hf import deepseek_v3
    from framework.convert.hf.mapping import to_hf_state

    cfg = dataclasses.replace(CFG, mtp=MTPConfig(depth=1))
    model = _model(0, cfg)
    save_hf(cfg, model.state_dict(), tmp_path / "dropped")
    assert not any(".layers.3." in k for k in load_file(tmp_path / "dropped" / "model.safetensors"))
    assert read_hf(tmp_path / "dropped")[0] == CFG  # no depth in the weights: imported without MTP
    files = deepseek_v3.to_files(cfg, to_hf_state(deepseek_v3.renames(cfg), model.state_dict()))
    assert "model.layers.3.eh_proj.weight" in files and "model.layers.3.shared_head.norm.weight" in files
    (tmp_path / "mtp").mkdir()
    save_file({k: v.contiguous() for k, v in files.items()}, tmp_path / "mtp" / "model.safetensors")
    config = json.loads((tmp_path / "dropped" / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    (tmp_path / "mtp" / "config.json").write_text(json.dumps(config))
    cfg_back, state = read_hf(tmp_path / "mtp")
    assert cfg_back.mtp is not None and cfg_back.mtp.depth == 1
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
