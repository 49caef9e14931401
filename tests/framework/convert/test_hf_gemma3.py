"""Gemma 3 text (gemma3_text) beyond the generic family checks (test_hf_families.py): a transformers-made model
with local and global layers (own window, RoPE base and scaling) imports with its logits and greedy decode, exports
back to the same tensors and config, the Hub's legacy RoPE keys read alike, and what either side cannot hold is
refused naming the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, ModelConfig
from framework.convert.hf.configs import check_representable
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.generate import greedy_decode
from tests.framework.convert.conftest import CONFIGS, VOCAB

TOL = 1e-4
SEQ = 11  # longer than the window
KINDS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
HF_GEMMA3 = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=5,
                 num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                 query_pre_attn_scalar=20, sliding_window=4, layer_types=KINDS, rope_parameters=ROPE)  # fmt: skip
CAPS = dict(final_logit_softcapping=5.0, attn_logit_softcapping=2.0)


def _save_gemma3(path: Path, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(**HF_GEMMA3 | overrides)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norm gains (QK-norm's included) away from their zero init, so a dropped one shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    return hf


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _loom(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def _diff(model: torch.nn.Module, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids) - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize("caps", [{}, CAPS], ids=["uncapped", "capped"])
def test_transformers_model_imports_with_its_logits_and_greedy_decode(tmp_path: Path, caps: dict) -> None:
    hf = _save_gemma3(tmp_path, **caps)
    cfg, state = read_hf(tmp_path)
    pattern = ["attention_local", "attention_local", "attention", "attention_local", "attention"]
    assert cfg.layers == LayersConfig(pattern=pattern, local_window=4, local_rope_theta=1e4)
    assert (cfg.sliding_window, cfg.full_attention_layers, cfg.qk_norm, cfg.sandwich_norm) == (
        None,
        None,
        True,
        True,
    )
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (1e6, "linear", 2.0)
    # transformers' Gemma 3 keeps the final cap but never applies attn_logit_softcapping: neither does the import
    assert (cfg.final_logit_softcap, cfg.attention_softcap) == (caps.get("final_logit_softcapping"), None)
    assert cfg.softmax_scale == 20**-0.5
    model, ids = _loom(cfg, state), _ids()
    assert _diff(model, hf, ids) <= TOL
    prompt = ids[:1, :4]
    ours, margins = greedy_decode(model, prompt, 12)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, -12:]  # fmt: skip
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "change",
    [{"local_rope_theta": 1e6}, {"local_rope_theta": None}, {"local_window": 64}],
    ids=["global_base", "global_rope", "no_window"],
)
def test_local_layers_need_their_own_window_and_rope(tmp_path: Path, change: dict) -> None:
    """The oracle tells the local layers' settings apart: each swapped for the global layers' differs."""
    hf = _save_gemma3(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg.layers is not None
    wrong = dataclasses.replace(cfg, layers=dataclasses.replace(cfg.layers, **change))
    assert _diff(_loom(wrong, state), hf, _ids()) > 0.01


def test_export_gives_back_the_tensors_config_and_logits(tmp_path: Path) -> None:
    hf = _save_gemma3(tmp_path / "hf")
    cfg, state = read_hf(tmp_path / "hf")
    save_hf(cfg, state, tmp_path / "back")
    theirs, ours = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "back"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["model_type"] == "gemma3_text" and written["architectures"] == ["Gemma3ForCausalLM"]
    assert (written["layer_types"], written["sliding_window"], written["query_pre_attn_scalar"]) == (
        KINDS,
        4,
        20,
    )
    assert written["rope_parameters"] == ROPE
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = _ids(6)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    assert read_hf(tmp_path / "back")[0] == cfg


def test_hub_legacy_rope_keys_read_alike(tmp_path: Path) -> None:
    """Hub configs store rope_theta, rope_local_base_freq and rope_scaling; transformers folds them into
    rope_parameters per layer kind, and the import is the same."""
    _save_gemma3(tmp_path)
    expected = read_hf(tmp_path)[0]
    written = json.loads((tmp_path / "config.json").read_text())
    del written["rope_parameters"]
    legacy = {
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(written | legacy))
    assert read_hf(tmp_path)[0] == expected


def test_scaled_local_rope_is_refused_on_import(tmp_path: Path) -> None:
    rope = ROPE | {"sliding_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}
    _save_gemma3(tmp_path, rope_parameters=rope)
    with pytest.raises(ConfigError) as error:
        read_hf(tmp_path)
    assert error.value.key == "rope_parameters"


GEMMA3 = CONFIGS["gemma3"].__dict__
REFUSED = {
    # Gemma 3's global layers have no window: Loom's windows there would not be exported
    "global_window": (GEMMA3 | {"sliding_window": 4}, "model.sliding_window"),
    "local_layers_without_qk_norm": (GEMMA3 | {"qk_norm": False}, "model.qk_norm"),
    "linear_mixer": (
        GEMMA3 | {"layers": LayersConfig(pattern=["attention_local", "mamba2"], local_window=4)},
        "model.layers.pattern",
    ),  # fmt: skip
    "llama_with_local_layers": (
        dict(layers=LayersConfig(pattern=["attention_local"], local_window=4)),
        "model.layers.pattern",
    ),  # fmt: skip
    # a gated attention output is Qwen3-Next's alone, and Qwen3-Next has none of Gemma's sandwich norms
    "gated_output": (GEMMA3 | {"attention_gate": True}, "model.sandwich_norm"),
    "attention_cap": (GEMMA3 | {"attention_softcap": 50.0}, "model.attention_softcap"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unrepresentable_configs_are_refused_naming_the_field(name: str) -> None:
    fields, key = REFUSED[name]
    with pytest.raises(ConfigError, match=key):
        check_representable(ModelConfig(**fields))


def test_loom_convert_cli_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    """`loom convert CKPT --to hf` then `--from hf`: transformers' logits, and model.layers through the
    checkpoint's recipe and the written YAML (the full per-layer pattern an import writes) come back."""
    from framework.config.loader import load_recipe
    from tests.framework.convert.test_convert_cli import run, write_checkpoint

    cfg = dataclasses.replace(CONFIGS["gemma3"], vocab_size=4100)  # the demo tokenizer
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model")
    code, _, err = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= TOL
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "back")
    assert code == 0, err
    assert load_recipe(tmp_path / "back" / "recipe.yaml").model == cfg
