"""Qwen3-Next (Qwen3NextForCausalLM) both ways against transformers' own model (its PyTorch fallbacks on CPU, no
fla / causal_conv1d): three Gated DeltaNet blocks then one gated attention block, partial RoPE (4 of 16 channels),
zero-centred norms, 6 experts top-3 with a 24-wide gated shared expert beside 20-wide experts; sequence 13
(not a multiple of the 64-token GDN chunk)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from framework.config.errors import ConfigError
from framework.config.loader import load_recipe
from framework.config.schema import GDNConfig, LayersConfig, ModelConfig, MoEConfig
from framework.convert.hf.configs import build_hf_model, check_representable, hf_family
from framework.convert.hf.convert import config_from_hf, save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.flops import param_counts
from framework.models.generate import greedy_decode
from framework.train.loss import compute_loss
from tests.framework.convert.conftest import VOCAB, random_model, routing_margins
from tests.framework.convert.test_convert_cli import run, write_checkpoint

SEQ, TOL, ROUTING_MARGIN = 13, 1e-4, 1e-4
CFG = ModelConfig(
    family="decoder", vocab_size=VOCAB, d_model=48, n_layers=4, n_heads=3, kv_heads=1, head_dim=16,
    ffn_hidden=40, max_seq_len=64, norm_eps=1e-6, qk_norm=True, norm_weight_offset=True, attention_gate=True,
    rope_fraction=0.25, rope_theta=5000.0, layers=LayersConfig(pattern=["gdn", "gdn", "gdn", "attention"]),
    gdn=GDNConfig(heads=6, key_heads=3, key_head_dim=8, value_head_dim=12, conv_kernel=4),
    moe=MoEConfig(n_experts=6, top_k=3, expert_hidden=20, n_shared_experts=1, shared_expert_hidden=24,
                  shared_expert_gate=True, renormalize=True, aux_loss=0.001),
)  # fmt: skip


def _ids(seed: int, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _ours(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), routing_margins(model) as margins:
        out = model(ids)
    assert min(margins) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    return out


def _theirs(hf: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None):
    with torch.no_grad():
        return hf(ids, labels=labels)


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_export_logits_loss_and_import_round_trip(tmp_path: Path) -> None:
    model = random_model(CFG)
    save_hf(CFG, model.state_dict(), tmp_path)
    hf = _load(tmp_path)
    assert type(hf).__name__ == "Qwen3NextForCausalLM"
    ids = _ids(1)
    ours = _ours(model, ids)
    labels = ids.clone()
    labels[:, ::3] = -100
    theirs = _theirs(hf, ids, torch.cat([torch.full_like(labels[:, :1], -100), labels[:, 1:]], dim=1))
    diff = (ours - theirs.logits).abs().max().item()
    print(f"qwen3_next: max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1
    loss = compute_loss(ours[:, :-1], labels[:, 1:], (labels[:, 1:] != -100).sum(), 0.0).loss
    assert abs(loss.item() - theirs.loss.item()) <= TOL
    cfg_back, state_back = read_hf(tmp_path)
    assert cfg_back == CFG
    assert state_back.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(state_back[key], tensor), key


def test_export_writes_the_hub_layout(tmp_path: Path) -> None:
    save_hf(CFG, random_model(CFG).state_dict(), tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "model.safetensors").items()}
    layer = "model.layers.{}."
    assert shapes[layer.format(3) + "self_attn.q_proj.weight"] == (2 * 3 * 16, 48)  # query and gate per head
    assert shapes[layer.format(0) + "linear_attn.in_proj_qkvz.weight"] == (2 * 24 + 2 * 72, 48)
    assert shapes[layer.format(0) + "linear_attn.conv1d.weight"] == (2 * 24 + 72, 1, 4)
    assert shapes[layer.format(2) + "mlp.experts.5.down_proj.weight"] == (48, 20)
    assert shapes[layer.format(2) + "mlp.shared_expert.up_proj.weight"] == (24, 48)
    assert shapes[layer.format(2) + "mlp.shared_expert_gate.weight"] == (1, 48)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in shapes)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert (config["decoder_sparse_step"], config["mlp_only_layers"], config["norm_topk_prob"]) == (
        1,
        [],
        True,
    )


def test_import_model_built_by_transformers_in_both_expert_layouts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = build_hf_model(CFG).eval()
    with torch.no_grad():  # transformers' init leaves the (1 + w) gains at 0 and the gated norm at 1
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "files")
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    cfg, state = read_hf(tmp_path / "files")
    _, fused = read_hf(tmp_path / "fused")
    assert cfg == CFG and all(torch.equal(fused[k], state[k]) for k in state)
    model = build_model(cfg)
    model.load_state_dict(state)
    ids = _ids(2)
    diff = (_ours(model.eval(), ids) - _theirs(hf, ids).logits).abs().max().item()
    print(f"qwen3_next: imported max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_greedy_decode_matches_transformers(tmp_path: Path) -> None:
    """transformers decodes with its caches (the GDN's recurrent step and conv state), Loom reruns the prefix."""
    model = random_model(CFG, seed=3)
    save_hf(CFG, model.state_dict(), tmp_path)
    hf = _load(tmp_path)
    prompt = _ids(4, 6)[:1]
    with routing_margins(model) as routing:
        ours, margins = greedy_decode(model, prompt, 20)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    assert min(routing) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    generated = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)  # fmt: skip
    assert torch.equal(ours, generated[:, -20:])


def test_parameter_count_equals_transformers() -> None:
    for cfg in (CFG, dataclasses.replace(CFG, moe=None, tie_embeddings=True)):
        hf = build_hf_model(cfg)
        assert param_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def _hf_config(**fields: object) -> transformers.Qwen3NextConfig:
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3,
                num_key_value_heads=1, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=64)  # fmt: skip
    return transformers.Qwen3NextConfig(**base | fields)


def test_layer_types_become_the_pattern_period_or_the_full_list() -> None:
    periodic = config_from_hf(_hf_config(num_hidden_layers=8))  # transformers' default: full every 4th layer
    assert periodic.layers is not None and periodic.layers.pattern == ["gdn", "gdn", "gdn", "attention"]
    assert periodic.mixers == ["gdn", "gdn", "gdn", "attention"] * 2
    # a period need not divide the layers (g a g | g); with none shorter, the full list
    repeated = config_from_hf(
        _hf_config(layer_types=["linear_attention", "full_attention"] + ["linear_attention"] * 2)
    )
    assert repeated.layers is not None and repeated.layers.pattern == ["gdn", "attention", "gdn"]
    irregular = ["linear_attention"] * 2 + ["full_attention"] * 2
    cfg = config_from_hf(_hf_config(layer_types=irregular))
    assert cfg.layers is not None and cfg.layers.pattern == ["gdn", "gdn", "attention", "attention"]
    dense = config_from_hf(_hf_config(layer_types=["full_attention"] * 4, num_experts=0))
    assert (
        dense.layers is None and dense.gdn is None and dense.moe is None and hf_family(dense) == "qwen3_next"
    )


def test_sparse_placement_and_dense_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(_hf_config(decoder_sparse_step=2)).eval()  # layers 1 and 3 sparse
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg.moe is not None and (cfg.moe.first_dense, cfg.moe.every) == (1, 2) and cfg.moe_layers == [1, 3]
    model = build_model(cfg)
    model.load_state_dict(state)
    ids = _ids(5)
    assert (_ours(model.eval(), ids) - _theirs(hf, ids).logits).abs().max() <= TOL
    with pytest.raises(ConfigError, match=r"makes layers \[0, 2, 3\] sparse"):
        config_from_hf(_hf_config(mlp_only_layers=[1]))


def _moe(**fields: object) -> ModelConfig:
    assert CFG.moe is not None
    return dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **fields))


@pytest.mark.parametrize(
    ("cfg", "fields"),
    [
        (dataclasses.replace(CFG, norm_weight_offset=False), ["model.norm_weight_offset=False"]),
        (dataclasses.replace(CFG, attention_gate=False), ["model.attention_gate=False"]),
        (_moe(shared_expert_gate=False), ["model.moe.shared_expert_gate=False"]),
        (_moe(n_shared_experts=2, shared_expert_hidden=None), ["model.moe.n_shared_experts=2"]),
        (
            _moe(capacity_factor=1.5, route_scale=2.0),
            ["model.moe.capacity_factor=1.5", "model.moe.route_scale"],
        ),
        (dataclasses.replace(CFG, sliding_window=5), ["model.sliding_window=5"]),
        (
            dataclasses.replace(
                CFG, moe=None, layers=LayersConfig(pattern=["gdn", "attention"], feed_forward=False)
            ),
            ["model.layers.feed_forward=False"],
        ),
        (
            dataclasses.replace(CFG, layers=LayersConfig(pattern=["gdn", "attention_local"], local_window=4)),
            ["model.layers.pattern"],
        ),
        # Qwen3-Next's fields in a family that has no tensor or switch for them
        (
            ModelConfig(
                vocab_size=VOCAB, d_model=48, n_heads=3, head_dim=16, qk_norm=True, rope_fraction=0.5
            ),
            ["model.rope_fraction=0.5"],
        ),
    ],
    ids=[
        "plain-norms",
        "ungated",
        "ungated-shared",
        "two-shared",
        "capacity",
        "window",
        "no-ffn",
        "local",
        "qwen3-partial-rope",
    ],  # fmt: skip
)
def test_settings_transformers_does_not_compute_are_refused(cfg: ModelConfig, fields: list[str]) -> None:
    cfg.validate()  # a valid Loom model, only not representable
    with pytest.raises(ConfigError) as refusal:
        check_representable(cfg)
    assert all(f in refusal.value.rule for f in fields), refusal.value.rule


def test_mtp_weights_are_skipped_and_a_missing_linear_attention_tensor_is_named(tmp_path: Path) -> None:
    save_hf(CFG, random_model(CFG).state_dict(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(weights | {"mtp.fc.weight": torch.ones(48, 96)}, tmp_path / "model.safetensors")
    cfg, state = read_hf(
        tmp_path
    )  # the Hub checkpoint's multi-token-prediction head is skipped, as transformers does
    assert cfg == CFG and not any(k.startswith("mtp") for k in state)
    del weights["model.layers.1.linear_attn.conv1d.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.linear_attn\.conv1d\.weight"):
        read_hf(tmp_path)


def test_cli_export_import_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    """`loom convert` both ways from a training checkpoint: the recipe's model section (layers, gdn, gated shared
    expert) survives meta.json -> config.json -> recipe.yaml, and the exported folder reads back bit for bit."""
    cfg = dataclasses.replace(CFG, vocab_size=4100)  # covers the demo tokenizer
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model", seed=1)
    code, _, err = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert code == 0, err
    ids = torch.randint(0, 4100, (2, SEQ), generator=torch.Generator().manual_seed(6))
    assert (_ours(model, ids) - _theirs(_load(tmp_path / "hf"), ids).logits).abs().max() <= TOL
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "back")
    assert code == 0, err
    assert load_recipe(tmp_path / "back" / "recipe.yaml").model == cfg
    _, state = read_hf(tmp_path / "hf")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_weights_of_another_gdn_layout_are_refused(tmp_path: Path) -> None:
    save_hf(CFG, random_model(CFG).state_dict(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"linear_num_key_heads": 2}))
    with pytest.raises(
        ConfigError, match=r"model\.layers\.0\.linear_attn\.in_proj_qkvz\.weight.*shapes model\.gdn"
    ):
        read_hf(tmp_path)
