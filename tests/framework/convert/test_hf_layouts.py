"""What the generic family tests cannot see: Qwen2's q/k/v-only biases, Phi-3's fused matrices against Llama's
separate ones, GPT-2's transposed Conv1D weights and old mask buffers, a Phi-3 import that exports back as Phi-3
through the CLI, and the settings these families refuse (in both directions)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework.config.errors import ConfigError
from framework.config.loader import load_recipe
from framework.config.schema import ModelConfig
from framework.convert.hf.configs import build_hf_model, check_representable
from framework.convert.hf.convert import export_state, save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from tests.framework.convert.conftest import CONFIGS, SEQ, VOCAB, random_model
from tests.framework.convert.test_convert_cli import run


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def test_qwen2_has_biases_on_q_k_v_only() -> None:
    cfg = CONFIGS["qwen2"]
    ours = {k for k in build_model(cfg).state_dict() if k.endswith(".bias")}
    theirs = {k for k in build_hf_model(cfg).state_dict() if k.endswith(".bias")}
    assert ours == {f"layers.{i}.attention.w{p}.bias" for i in range(cfg.n_layers) for p in "qkv"}
    assert theirs == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(cfg.n_layers) for p in "qkv"}


def test_phi3_fuses_exactly_the_llama_tensors() -> None:
    """Phi-3's qkv_proj is Llama's [q_proj; k_proj; v_proj] (RoPE rows permuted the same way) and gate_up_proj
    is [gate_proj; up_proj]; everything else is named as in Llama."""
    cfg = CONFIGS["phi3"]
    state = random_model(cfg).state_dict()
    phi3 = export_state(cfg, state)
    llama = export_state(dataclasses.replace(cfg, hf_architecture="auto"), state)
    for i in range(cfg.n_layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = torch.cat([llama.pop(f"{at}{p}_proj.weight") for p in "qkv"])
        assert torch.equal(phi3.pop(f"{at}qkv_proj.weight"), qkv)
        gate_up = torch.cat([llama.pop(f"{mlp}{p}_proj.weight") for p in ("gate", "up")])
        assert torch.equal(phi3.pop(f"{mlp}gate_up_proj.weight"), gate_up)
    assert phi3.keys() == llama.keys()
    assert all(torch.equal(phi3[k], llama[k]) for k in phi3)


def test_llama_still_exports_as_llama(tmp_path: Path) -> None:
    cfg = dataclasses.replace(CONFIGS["phi3"], hf_architecture="auto")
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    cfg = dataclasses.replace(cfg, sliding_window=None)
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_gpt2_conv1d_weights_are_transposed_and_mask_buffers_ignored(tmp_path: Path) -> None:
    """A transformers-initialised GPT-2 (Conv1D weights [in, out]) saved as old checkpoints were, with each
    layer's causal-mask buffers: Loom's nn.Linear weights are the transposes, and the logits agree."""
    cfg = CONFIGS["gpt2"]
    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()
    hf.save_pretrained(tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    for i in range(cfg.n_layers):
        files[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, cfg.max_seq_len, cfg.max_seq_len))
        files[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(files, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, state = read_hf(tmp_path)
    d = cfg.d_model
    c_attn = hf.transformer.h[1].attn.c_attn.weight  # [d, 3d]: columns q | k | v
    assert c_attn.shape == (d, 3 * d)
    for j, p in enumerate("qkv"):
        assert torch.equal(state[f"layers.1.attention.w{p}.weight"], c_attn[:, j * d : (j + 1) * d].T)
    assert torch.equal(state["layers.0.feed_forward.w1.weight"], hf.transformer.h[0].mlp.c_fc.weight.T)
    model = build_model(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        diff = (model.eval()(input_ids=_ids()) - hf(input_ids=_ids()).logits).abs().max().item()
    assert diff <= 1e-4


def test_gpt2_saved_as_the_bare_model_imports(tmp_path: Path) -> None:
    """GPT2Model.save_pretrained (as the original gpt2 files) drops the `transformer.` prefix of every name."""
    cfg = CONFIGS["gpt2"]
    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()
    hf.transformer.save_pretrained(tmp_path)
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    cfg_back, state = read_hf(tmp_path)
    assert cfg_back == cfg
    model = build_model(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        diff = (model.eval()(input_ids=_ids()) - hf(input_ids=_ids()).logits).abs().max().item()
    assert diff <= 1e-4


def test_gpt2_export_keeps_the_recipe_dropout(tmp_path: Path) -> None:
    """GPT2Config would default every dropout to 0.1; the export writes the recipe's rates."""
    cfg = dataclasses.replace(CONFIGS["gpt2"], dropout=0.05, attention_dropout=0.0)
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["resid_pdrop"], config["embd_pdrop"], config["attn_pdrop"]) == (0.05, 0.05, 0.0)


def test_phi3_import_exports_back_as_phi3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    """`loom convert --from hf` records hf_architecture in the recipe; `--to hf` of that checkpoint writes
    Phi-3 again, with the same tensors."""
    cfg = dataclasses.replace(CONFIGS["phi3"], vocab_size=4100)  # covers the demo tokenizer
    torch.manual_seed(0)
    build_hf_model(cfg).save_pretrained(tmp_path / "hf")
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "loom")
    assert code == 0, err
    assert load_recipe(tmp_path / "loom" / "recipe.yaml").model == cfg
    ckpt = tmp_path / "loom" / "checkpoints" / "step_00000000"
    tokenizer = demo_data / "tokenizer.model"
    code, _, err = run(capsys, "convert", ckpt, "--to", "hf", tmp_path / "back", "--tokenizer", tokenizer)
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)


# --------------------------------------------------------------------------------------------- refusals
def _refused(cfg: ModelConfig) -> str:
    cfg.validate()  # a valid Loom model, only not representable
    with pytest.raises(ConfigError) as refusal:
        check_representable(cfg)
    return refusal.value.rule


@pytest.mark.parametrize(
    "base,change,field",
    [
        ("qwen2", {"qk_norm": True}, "model.qk_norm=True"),
        ("bloom", {"bias_scope": "qkv"}, "model.bias_scope='qkv'"),
        ("gpt2", {"bias_scope": "qkv"}, "model.bias_scope='qkv'"),
        ("phi3", {"bias": True}, "model.bias=True"),
        ("phi3", {"rope_scaling": "linear", "rope_scaling_factor": 2.0}, "model.rope_scaling='linear'"),
        ("phi3", {"qk_norm": True}, "model.qk_norm=True"),
        ("bert", {"hf_architecture": "phi3"}, "model.hf_architecture='phi3'"),
        ("mixtral", {"hf_architecture": "phi3"}, "model.hf_architecture='phi3'"),
        ("gpt2", {"kv_heads": 1}, "model.kv_heads=1"),
        ("gpt2", {"head_dim": 8}, "model.head_dim=8"),
        ("gpt2", {"sliding_window": 4}, "model.sliding_window=4"),
        ("gpt2", {"mlp": "swiglu"}, "model.mlp='swiglu'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_export_refuses_what_the_family_cannot_hold(base: str, change: dict[str, Any], field: str) -> None:
    assert field in _refused(dataclasses.replace(CONFIGS[base], **change))


def test_bias_scope_needs_bias() -> None:
    with pytest.raises(ConfigError) as refusal:
        dataclasses.replace(CONFIGS["qwen2"], bias=False).validate()
    assert refusal.value.key == "model.bias_scope"


@pytest.mark.parametrize(
    "name,change,key",
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, "layer_types"),
        ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
        ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_import_refuses_what_loom_does_not_compute(
    name: str, change: dict[str, Any], key: str, tmp_path: Path
) -> None:
    cfg = CONFIGS[name]
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop(
        "layer_types", None
    )  # as older Qwen2 configs: derived from use_sliding_window/max_window_layers
    (tmp_path / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ConfigError) as refusal:
        read_hf(tmp_path)
    assert refusal.value.key == key, refusal.value
