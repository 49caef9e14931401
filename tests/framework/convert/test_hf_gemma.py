"""Gemma / Gemma 2 specifics beyond the generic family checks (test_hf_families.py): transformers' alternating
sliding/full layers, query_pre_attn_scalar, and the configurations either side refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig
from framework.convert.hf.configs import check_representable, hf_config
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from tests.framework.convert.conftest import CONFIGS, SEQ, VOCAB, random_model

HF_GEMMA2 = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                 query_pre_attn_scalar=16, final_logit_softcapping=5.0, attn_logit_softcapping=2.0)  # fmt: skip


def _save_gemma2(path: Path, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**HF_GEMMA2 | overrides)
    hf = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from their zero init, so a swapped norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    return hf


def test_transformers_default_alternating_layers_import_exactly(tmp_path: Path) -> None:
    # transformers' default layer_types alternate sliding and full, here with a window the input exceeds
    hf = _save_gemma2(tmp_path, sliding_window=5)
    assert hf.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    cfg, state = read_hf(tmp_path)
    assert (cfg.sliding_window, cfg.full_attention_layers) == (5, [1])
    assert cfg.sandwich_norm and cfg.softmax_scale == 16**-0.5
    assert (cfg.final_logit_softcap, cfg.attention_softcap) == (5.0, 2.0)
    model = build_model(cfg)
    model.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
        model.full_attention = set()  # every layer windowed: not what transformers computes
        wrong = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4 and wrong > 0.01


@pytest.mark.parametrize(
    ("types", "window", "full"),
    [
        (["sliding_attention"] * 3, 8, None),
        (["full_attention"] * 3, None, None),
        (["full_attention", "full_attention", "sliding_attention"], 8, [0, 1]),
    ],
)
def test_layer_types_map_to_window_and_full_layers(
    tmp_path: Path, types: list, window: int, full: list
) -> None:
    _save_gemma2(tmp_path, sliding_window=8, layer_types=types)
    cfg = read_hf(tmp_path)[0]
    assert (cfg.sliding_window, cfg.full_attention_layers) == (window, full)
    assert hf_config(cfg)[1].layer_types == types  # and back


def test_unknown_layer_kinds_are_refused(tmp_path: Path) -> None:
    _save_gemma2(tmp_path, sliding_window=8)
    written = json.loads((tmp_path / "config.json").read_text())
    written["layer_types"] = ["chunked_attention"] * 3
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError) as error:
        read_hf(tmp_path)
    assert error.value.key == "layer_types"


def test_export_writes_query_pre_attn_scalar_and_uniform_layer_types(tmp_path: Path) -> None:
    cfg = CONFIGS["gemma2_window_untied"]
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["query_pre_attn_scalar"] == 20 and written["sliding_window"] == 5
    assert written["layer_types"] == ["sliding_attention"] * 3
    assert written["hidden_activation"] == "gelu_pytorch_tanh" and written["model_type"] == "gemma2"
    plain = ModelConfig(**CONFIGS["gemma2"].__dict__ | {"softmax_scale": "inv_sqrt_dk"})
    assert hf_config(plain)[1].query_pre_attn_scalar == 12  # head_dim
    assert hf_config(CONFIGS["gemma"])[1].hidden_act == "gelu_pytorch_tanh"


REFUSED = {
    # a Llama with one Gemma 2 feature: the family has the feature, the config lacks the rest
    "llama_with_cap": (dict(final_logit_softcap=30.0), "sandwich_norm"),
    "gemma_with_bias": (dict(**CONFIGS["gemma"].__dict__ | {"bias": True}), "model.bias"),
    "gemma_swiglu": (dict(**CONFIGS["gemma"].__dict__ | {"mlp": "swiglu"}), "model.mlp"),
    "gemma_window": (dict(**CONFIGS["gemma"].__dict__ | {"sliding_window": 4}), "model.sliding_window"),
    "mistral_full_layers": (dict(sliding_window=4, full_attention_layers=[1]), "full_attention_layers"),
    "gemma2_scale_none": (dict(**CONFIGS["gemma2"].__dict__ | {"softmax_scale": "none"}), "softmax_scale"),
    "gemma2_scale_not_integer": (
        dict(**CONFIGS["gemma2"].__dict__ | {"softmax_scale": 0.3}),
        "softmax_scale",
    ),
    "gemma2_exact_gelu": (
        dict(**CONFIGS["gemma2"].__dict__ | {"gelu_approximate": "none"}),
        "gelu_approximate",
    ),
    "llama_with_offset_norm": (dict(norm_weight_offset=True), "embedding_scale"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unrepresentable_configs_are_refused_naming_the_field(name: str) -> None:
    fields, key = REFUSED[name]
    with pytest.raises(ConfigError, match=key):
        check_representable(ModelConfig(**fields))


@pytest.mark.parametrize(
    ("family", "change", "key"),
    [
        ("gemma", {"hidden_act": "silu"}, "hidden_act"),
        ("gemma", {"attention_bias": True}, "attention_bias"),
        ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_import_refuses_what_loom_cannot_compute(tmp_path: Path, family: str, change: dict, key: str) -> None:
    cfg = CONFIGS[family]
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(written | change))
    with pytest.raises(ConfigError) as error:
        read_hf(tmp_path)
    assert error.value.key == key


def test_loom_convert_cli_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    """`loom convert CKPT --to hf` then `loom convert HF --from hf`: transformers' logits and the recipe's model
    (its float softmax scale through YAML included) come back."""
    from framework.config.loader import load_recipe
    from tests.framework.convert.test_convert_cli import run, write_checkpoint

    cfg = ModelConfig(**CONFIGS["gemma2_window_untied"].__dict__ | {"vocab_size": 4100})  # the demo tokenizer
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model")
    code, _, err = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Gemma2ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "back")
    assert code == 0, err
    assert load_recipe(tmp_path / "back" / "recipe.yaml").model == cfg
