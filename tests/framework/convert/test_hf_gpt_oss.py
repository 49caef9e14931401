"""gpt-oss (GptOssForCausalLM) both ways against transformers' own model: 3 layers alternating sliding (window 5)
and full attention, 5 query heads over 1 KV head with biases and learned sinks, YaRN RoPE (truncate false) used
past its original 16 positions, 6 biased clamped-SwiGLU experts top-3 (limit 0.5 so the clamps bind) behind a
biased router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, ModelConfig, MoEConfig
from framework.convert.hf.configs import build_hf_model, check_representable, hf_family
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.generate import greedy_decode
from tests.framework.convert.conftest import VOCAB, random_model, routing_margins

TOL, ROUTING_MARGIN = 1e-4, 1e-4
CFG = ModelConfig(
    family="decoder", vocab_size=VOCAB, d_model=40, n_layers=3, n_heads=5, kv_heads=1, head_dim=8,
    ffn_hidden=16, max_seq_len=64, bias=True, attention_sinks=True, mlp="clamped_swiglu", swiglu_limit=0.5,
    rope_theta=5000.0, rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16,
    rope_yarn_truncate=False, layers=LayersConfig(pattern=["attention_local", "attention"], local_window=5),
    moe=MoEConfig(n_experts=6, top_k=3, expert_hidden=16, router_bias=True, expert_linear_bias=True,
                  aux_loss=0.001),
)  # fmt: skip


def _model(seed: int = 0) -> torch.nn.Module:
    model = random_model(CFG, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # sinks far from 0, so a dropped or misplaced sink changes the logits
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _ids(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _ours(model: torch.nn.Module, ids: torch.Tensor, decode: bool = False):
    with torch.no_grad(), routing_margins(model) as margins:
        out = greedy_decode(model, ids, 12) if decode else model(ids)
    assert min(margins) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    return out


def _logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


def test_export_logits_decode_and_import_round_trip(tmp_path: Path) -> None:
    assert hf_family(CFG) == "gpt_oss"
    model = _model()
    save_hf(CFG, model.state_dict(), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == "GptOssForCausalLM"
    assert hf.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    ids = _ids(1)
    ours = _ours(model, ids)
    diff = (ours - _logits(hf, ids)).abs().max().item()
    print(f"gpt_oss: export max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1
    prompt = _ids(2, 6)[:1]
    tokens, margins = _ours(model, prompt, decode=True)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, use_cache=True)  # fmt: skip
    assert torch.equal(tokens, theirs[:, -12:])
    cfg_back, state_back = read_hf(tmp_path / "out")
    assert cfg_back == CFG and state_back.keys() == model.state_dict().keys()
    assert all(torch.equal(state_back[k], t) for k, t in model.state_dict().items())


def test_import_a_model_transformers_built(tmp_path: Path) -> None:
    """transformers' own random model (its init; sinks and router bias set by hand) imports with equal logits."""
    torch.manual_seed(0)
    hf = build_hf_model(CFG).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.normal_()
            layer.mlp.router.weight.normal_(std=0.5)
            layer.mlp.router.bias.normal_(std=0.3)
            layer.mlp.experts.gate_up_proj_bias.normal_(std=0.3)
    hf.save_pretrained(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg == CFG
    model = build_model(cfg).eval()
    model.load_state_dict(state)
    ids = _ids(4, 20)
    diff = (_ours(model, ids) - _logits(hf, ids)).abs().max().item()
    print(f"gpt_oss import: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_mxfp4_checkpoints_are_refused_with_the_fix(tmp_path: Path) -> None:
    save_hf(CFG, _model().state_dict(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    blocks = weights.pop("model.layers.0.mlp.experts.gate_up_proj")
    weights["model.layers.0.mlp.experts.gate_up_proj_blocks"] = blocks.to(torch.uint8)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError) as err:
        read_hf(tmp_path)
    assert "MXFP4" in err.value.rule and "dequantize" in err.value.fix


def test_gpt_oss_mistakes_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local_rope_theta"):
        check_representable(ModelConfig(**{**CFG.__dict__, "layers": LayersConfig(
            pattern=["attention_local", "attention"], local_window=5, local_rope_theta=1e4)}))  # fmt: skip
    with pytest.raises(ConfigError, match="needs an MoE"):
        check_representable(ModelConfig(**{**CFG.__dict__, "moe": None}))
    save_hf(CFG, _model().state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"layer_types": ["chunked_attention"] * 3}))
    with pytest.raises(ConfigError, match="layer_types"):
        read_hf(tmp_path)
