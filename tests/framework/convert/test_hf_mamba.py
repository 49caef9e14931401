"""Mamba-2 (Mamba2ForCausalLM) and Bamba (BambaForCausalLM) both ways against transformers' torch path on CPU:
logits, loss and greedy decode (transformers decodes step by step from its SSM / conv / KV cache, Loom reruns the
sequence), weights back bit for bit, transformers-initialised models imported, and what either side refuses.

Odd sizes on purpose: hidden 48, 6 SSM heads of 8, state 16, 2 B/C groups (the gated norm is per group), conv 4,
chunk 8 with 13 tokens (a partial last chunk); Bamba: 4 blocks with attention at index 2, 3 query heads of 16 over
1 kv head, RoPE on half of each head."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, Mamba2Config, ModelConfig
from framework.convert.hf.configs import build_hf_model, check_representable, hf_config
from framework.convert.hf.convert import save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.generate import greedy_decode
from framework.train.loss import compute_loss
from tests.framework.convert.conftest import VOCAB, random_model

TOL = 1e-4
SEQ = 13  # not a multiple of the chunk
MAMBA = Mamba2Config(heads=6, head_dim=8, state_dim=16, groups=2, conv_kernel=4, chunk_size=8)
_COMMON = dict(family="decoder", vocab_size=VOCAB, d_model=48, max_seq_len=64, norm_eps=1e-6)
_MAMBA2 = _COMMON | dict(n_layers=2, n_heads=6, head_dim=8, position="none", mamba2=MAMBA,
                         layers=LayersConfig(pattern=["mamba2"], feed_forward=False))  # fmt: skip
_BAMBA = _COMMON | dict(n_layers=4, n_heads=3, kv_heads=1, head_dim=16, ffn_hidden=72, rope_fraction=0.5,
                        rope_theta=500.0, mamba2=MAMBA,
                        layers=LayersConfig(pattern=["mamba2", "mamba2", "attention"]))  # fmt: skip
CONFIGS = {
    "mamba2": ModelConfig(**_MAMBA2),
    "mamba2_tied_no_conv_bias": ModelConfig(
        **_MAMBA2 | {"mamba2": dataclasses.replace(MAMBA, conv_bias=False)}, tie_embeddings=True
    ),
    "bamba": ModelConfig(**_BAMBA),
    "bamba_tied_bias": ModelConfig(**_BAMBA, tie_embeddings=True, bias=True),
}


def _ids(seed: int, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _load_hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_logits_loss_and_import_round_trip(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path)
    hf = _load_hf(tmp_path)
    assert type(hf).__name__ == hf_config(cfg)[0]
    ids = _ids(1)
    labels = ids.clone()
    labels[:, ::3] = -100
    with torch.no_grad():
        ours, out = model(ids), hf(ids, labels=labels)
    diff = (ours - out.logits).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1
    loss = compute_loss(ours[:, :-1], labels[:, 1:], (labels[:, 1:] != -100).sum(), 0.0).loss
    assert abs(loss.item() - out.loss.item()) <= TOL
    cfg_back, state_back = read_hf(tmp_path)
    assert cfg_back == cfg
    original = model.state_dict()
    assert state_back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(state_back[key], tensor), key


@pytest.mark.parametrize("name", ["mamba2", "bamba"])
def test_import_model_built_by_transformers(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()  # transformers' own init (Bamba: dt_bias 1, A = 1..H), no download
    with torch.no_grad():  # gains away from 1 and D away from 1, so a swapped norm or a dropped skip shows
        for param_name, p in hf.named_parameters():
            if param_name.endswith(("norm.weight", "layernorm.weight", ".D", "norm_f.weight")):
                p.add_(0.3 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path)
    cfg_back, state = read_hf(tmp_path)
    model = build_model(cfg_back)
    model.load_state_dict(state)
    ids = _ids(2)
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    print(f"{name}: imported max |logit diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["mamba2", "bamba"])
def test_greedy_decode_matches_transformers(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=3)
    save_hf(cfg, model.state_dict(), tmp_path)
    hf = _load_hf(tmp_path)
    prompt = _ids(4)[:1, :6]
    ours, margins = greedy_decode(model, prompt, 20)  # 26 tokens: the recomputed scan spans 4 chunks
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    generated = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)  # fmt: skip
    assert torch.equal(ours, generated[:, -20:])


@pytest.mark.parametrize(
    ("layers", "indices", "pattern"),
    [
        (6, [2, 5], ["mamba2", "mamba2", "attention"]),  # a period, repeated from the start
        (5, [0], ["attention", "mamba2", "mamba2", "mamba2", "mamba2"]),  # nothing shorter repeats
        (3, None, ["mamba2"]),  # no attention at all, still an MLP in every block
    ],
)
def test_bamba_attention_layers_map_to_the_pattern(
    layers: int, indices: list | None, pattern: list, tmp_path: Path
) -> None:
    """attn_layer_indices <-> model.layers.pattern (Loom's repeats from the start) and back."""
    config = transformers.BambaConfig(**_hf_bamba(), num_hidden_layers=layers, attn_layer_indices=indices)
    transformers.BambaForCausalLM(config).save_pretrained(tmp_path)
    cfg = read_hf(tmp_path)[0]
    assert cfg.layers.pattern == pattern and cfg.layers.feed_forward
    expected = ["attention" if kind == "full_attention" else "mamba2" for kind in config.layers_block_type]
    assert cfg.mixers == expected
    assert (cfg.rope_fraction, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim) == (0.5, 3, 1, 16)
    assert hf_config(cfg)[1].layers_block_type == config.layers_block_type


def _hf_bamba() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_attention_heads=3,
                num_key_value_heads=1, mamba_n_heads=6, mamba_d_head=8, mamba_d_state=16, mamba_n_groups=2,
                mamba_expand=1, mamba_chunk_size=8, max_position_embeddings=64, pad_token_id=None)  # fmt: skip


def _hf_mamba2() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_heads=6, head_dim=8, state_size=16,
                n_groups=2, expand=1, chunk_size=8, pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip


@pytest.mark.parametrize(
    ("family", "field", "value"),
    [
        ("mamba2", "use_bias", True),
        ("mamba2", "time_step_limit", [0.0, 0.1]),
        ("mamba2", "hidden_act", "gelu"),
        ("bamba", "mamba_proj_bias", True),
        ("bamba", "time_step_limit", [0.001, 100.0]),
        ("bamba", "mlp_bias", True),  # attention_bias stays false: Loom's one bias switch cannot say both
    ],
)
def test_switches_loom_lacks_are_refused_on_import(
    family: str, field: str, value: object, tmp_path: Path
) -> None:
    config, model = {
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
        "bamba": (transformers.BambaConfig, transformers.BambaForCausalLM),
    }[family]
    fields = _hf_mamba2() if family == "mamba2" else _hf_bamba()
    model(config(**fields)).save_pretrained(tmp_path)
    read_hf(tmp_path)  # the plain config imports
    written = json.loads((tmp_path / "config.json").read_text())
    written[field] = value
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError) as error:
        read_hf(tmp_path)
    assert error.value.key == field


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # attention blocks without an MLP: neither Mamba2 (no attention) nor Bamba (an MLP in every block)
        (
            {"layers": LayersConfig(pattern=["mamba2", "attention"], feed_forward=False)},
            "model.layers.pattern",
        ),
        ({"layers": LayersConfig(pattern=["mamba2", "gdn"])}, "model.layers.pattern"),
        (
            {"mamba2": dataclasses.replace(MAMBA, heads=5)},
            "model.mamba2.heads",
        ),  # inner 40: no integer expand
        ({"position": "learned"}, "model.position"),
    ],
)
def test_mamba2_configs_transformers_cannot_hold_are_refused(change: dict, named: str) -> None:
    fields = _MAMBA2 | change
    if "gdn" in fields["layers"].pattern:
        from framework.config.schema import GDNConfig

        fields["gdn"] = GDNConfig(heads=2, key_head_dim=8, value_head_dim=8)
    with pytest.raises(ConfigError) as error:
        check_representable(ModelConfig(**fields))
    assert named + "=" in error.value.rule


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_fraction": 1.0}, "model.rope_fraction"),  # transformers hard-codes half of each head
        ({"sliding_window": 8}, "model.sliding_window"),
        ({"qk_norm": True}, "model.qk_norm"),
        ({"rope_scaling": "linear", "rope_scaling_factor": 2.0}, "model.rope_scaling"),
    ],
)
def test_bamba_configs_transformers_cannot_hold_are_refused(change: dict, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_representable(ModelConfig(**_BAMBA | change))
    assert named + "=" in error.value.rule


def test_partial_rotary_is_not_full_rotary(tmp_path: Path) -> None:
    """The same weights under full rotary give other logits: the half-rotary mapping is what the match rests on."""
    cfg = CONFIGS["bamba"]
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path)
    hf = _load_hf(tmp_path)
    full = build_model(dataclasses.replace(cfg, rope_fraction=1.0))
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong = (full.eval()(_ids(1)) - hf(_ids(1)).logits).abs().max().item()
    assert wrong > 0.01


@pytest.mark.parametrize("name", ["mamba2", "bamba"])
def test_loom_convert_cli_round_trip(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    """`loom convert CKPT --to hf` then `--from hf`: transformers' logits, and the recipe's model.layers and
    model.mamba2 sections back through the checkpoint's metadata and the written recipe.yaml."""
    from framework.config.loader import load_recipe
    from tests.framework.convert.test_convert_cli import run, write_checkpoint

    cfg = dataclasses.replace(CONFIGS[name], vocab_size=4100)  # the demo tokenizer
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model")
    code, _, err = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert code == 0, err
    hf = _load_hf(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= TOL
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "back")
    assert code == 0, err
    assert load_recipe(tmp_path / "back" / "recipe.yaml").model == cfg


@pytest.mark.parametrize(("field", "value"), [("rope_fraction", 0.5), ("attention_gate", True)])
def test_attention_families_refuse_partial_rotary_and_gated_output(field: str, value: object) -> None:
    """Llama and the others rotate whole heads and have no output gate: exporting such a model as one of them would
    silently compute something else. (A gated output makes the model Qwen3-Next's, which refuses the rest.)"""
    cfg = ModelConfig(**_COMMON | dict(n_layers=2, n_heads=3, head_dim=16, ffn_hidden=72), **{field: value})
    with pytest.raises(ConfigError) as error:
        check_representable(cfg)
    if field == "attention_gate":  # detected as Qwen3-Next, which has the gate but no plain-Llama layers
        assert error.value.value == "qwen3_next", error.value
    else:
        assert f"model.{field}=" in error.value.rule


def test_older_embedding_name_imports(tmp_path: Path) -> None:
    """`backbone.embedding.weight` (older Mamba-2 files, which Mamba2Model's load_state_dict hook renames)
    imports as well."""
    from safetensors.torch import load_file, save_file

    cfg = CONFIGS["mamba2"]
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    state = read_hf(tmp_path)[1]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
