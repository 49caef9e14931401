"""GLM-4.5 (Glm4MoeForCausalLM) both ways against transformers' own model: 3 layers (the first dense), 6 heads over
2 KV heads of 12 channels with RoPE on the first 6 (partial_rotary_factor 0.5), q/k/v biases, QK-norm, 6 experts
top-3 in 3 groups of which the best 2 are searched, a nonzero selection bias (e_score_correction_bias), weights
renormalised and scaled by 2.5, one shared expert."""

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
from framework.config.schema import ModelConfig, MoEConfig, MTPConfig
from framework.convert.hf.configs import build_hf_model, check_representable, hf_family
from framework.convert.hf.convert import config_from_hf, save_hf
from framework.convert.hf.importer import read_hf
from framework.models import build_model
from framework.models.flops import param_counts
from framework.models.generate import greedy_decode
from framework.models.moe import Router
from tests.framework.convert import test_convert_cli as convert_cli
from tests.framework.convert.conftest import VOCAB, random_model
from tests.framework.convert.test_convert_cli import run, write_checkpoint

SEQ, TOL, ROUTING_MARGIN = 13, 1e-4, 1e-4
CFG = ModelConfig(
    family="decoder", vocab_size=VOCAB, d_model=48, n_layers=3, n_heads=6, kv_heads=2, head_dim=12,
    ffn_hidden=40, max_seq_len=64, norm_eps=1e-5, qk_norm=True, bias=True, bias_scope="qkv", rope_fraction=0.5,
    rope_theta=5000.0,
    moe=MoEConfig(n_experts=6, top_k=3, expert_hidden=20, n_shared_experts=1, first_dense=1, router="sigmoid",
                  n_groups=3, topk_groups=2, renormalize=True, route_scale=2.5, aux_loss=0.0, expert_bias=True),
)  # fmt: skip
RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def _model(seed: int = 0, cfg: ModelConfig = CFG) -> torch.nn.Module:
    """random_model with the selection biases perturbed too (it perturbs parameters only)."""
    model = random_model(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
    return model


def _margins(router: Router, logits: torch.Tensor) -> float:
    """The smallest gap, over tokens, between the last chosen and the first rejected group score, and between the
    k-th and (k+1)-th selection score among the allowed experts: two implementations whose ~1e-6 differences
    cannot swap a choice route identically only if both are well above that."""
    moe = router.moe
    choice = logits.sigmoid() + router.expert_bias
    grouped = choice.view(-1, moe.n_groups, moe.n_experts // moe.n_groups)
    group = grouped.topk(2, dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
    best = group[:, moe.topk_groups - 1 : moe.topk_groups + 1]
    gaps = [best[:, 0] - best[:, 1]] if moe.n_groups > moe.topk_groups else []
    allowed = router._mask_groups(choice).sort(dim=-1, descending=True).values
    gaps.append(allowed[:, moe.top_k - 1] - allowed[:, moe.top_k])
    return min(g.min().item() for g in gaps)


def _routed(model: torch.nn.Module, ids: torch.Tensor, decode: bool = False):
    margins: list[float] = []

    def record(router: Router, _: tuple[torch.Tensor, ...], routing) -> None:
        margins.append(_margins(router, routing.logits))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            out = greedy_decode(model, ids, 12) if decode else model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert min(margins) > ROUTING_MARGIN, "pick a seed whose routing has no near-ties"
    return out


def _ids(seed: int, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


def test_export_logits_and_import_round_trip(tmp_path: Path) -> None:
    model = _model()
    save_hf(CFG, model.state_dict(), tmp_path / "out")
    hf = _load(tmp_path / "out")
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    ids = _ids(1)
    ours = _routed(model, ids)
    diff = (ours - _logits(hf, ids)).abs().max().item()
    print(f"glm4_moe: export max |logit diff| = {diff:.2e}")
    assert diff <= TOL and ours.std() > 0.1
    cfg_back, state_back = read_hf(tmp_path / "out")
    assert cfg_back == CFG and state_back.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(state_back[key], tensor), key
    save_hf(cfg_back, state_back, tmp_path / "again")  # the round trip writes the same files
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "out" / "config.json").read_text() == (tmp_path / "again" / "config.json").read_text()


def test_export_writes_the_hub_layout(tmp_path: Path) -> None:
    save_hf(CFG, _model().state_dict(), tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "model.safetensors").items()}
    layer = "model.layers.{}."
    assert shapes[layer.format(0) + "mlp.gate_proj.weight"] == (40, 48)  # first_k_dense_replace 1
    assert shapes[layer.format(1) + "mlp.experts.5.down_proj.weight"] == (48, 20)
    assert shapes[layer.format(2) + "mlp.shared_experts.up_proj.weight"] == (20, 48)
    assert shapes[layer.format(2) + "mlp.gate.e_score_correction_bias"] == (6,)
    assert shapes[layer.format(1) + "self_attn.q_proj.bias"] == (72,)
    assert shapes[layer.format(1) + "self_attn.k_norm.weight"] == (12,)
    assert layer.format(1) + "self_attn.o_proj.bias" not in shapes
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in shapes)
    config = json.loads((tmp_path / "config.json").read_text())
    expected = {"n_routed_experts": 6, "num_experts_per_tok": 3, "n_group": 3, "topk_group": 2,
                "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_shared_experts": 1,
                "first_k_dense_replace": 1, "moe_intermediate_size": 20, "attention_bias": True,
                "use_qk_norm": True, "head_dim": 12, "num_nextn_predict_layers": 0}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5


def test_import_model_built_by_transformers_in_both_expert_layouts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = build_hf_model(CFG).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1, biases and the selection bias at 0
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    hf.save_pretrained(tmp_path / "files")
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert any(k.endswith("gate_up_proj") for k in load_file(tmp_path / "fused" / "model.safetensors"))
    cfg, state = read_hf(tmp_path / "files")
    _, fused = read_hf(tmp_path / "fused")
    assert cfg == CFG and all(torch.equal(fused[k], state[k]) for k in state)
    model = build_model(cfg)
    model.load_state_dict(state)
    ids = _ids(2)
    diff = (_routed(model.eval(), ids) - _logits(hf, ids)).abs().max().item()
    print(f"glm4_moe: import max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_greedy_decode_matches_transformers(tmp_path: Path) -> None:
    model = _model(seed=3)
    save_hf(CFG, model.state_dict(), tmp_path)
    hf = _load(tmp_path)
    prompt = _ids(4, 6)[:1]
    ours, margins = _routed(model, prompt, decode=True)
    assert margins.min().item() > 1e-4, "pick a seed whose greedy path has no near-ties"
    generated = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0, use_cache=True)  # fmt: skip
    assert torch.equal(ours, generated[:, -12:])


@pytest.mark.parametrize(
    ("n_groups", "topk_groups", "renormalize", "scale"),
    [(1, 1, True, 1.0), (3, 1, False, 1.0), (4, 2, True, 2.5), (8, 3, False, 0.5)],
)
def test_router_matches_glm4_moe_topk_router(
    n_groups: int, topk_groups: int, renormalize: bool, scale: float
) -> None:
    """Loom's Router and transformers' Glm4MoeTopkRouter with the same weight and bias choose the same experts
    with the same weights on random tokens (24 experts top-4; a strong bias, so it changes selections)."""
    moe = MoEConfig(n_experts=24, top_k=4, router="sigmoid", n_groups=n_groups, topk_groups=topk_groups,
                    renormalize=renormalize, route_scale=scale, expert_bias=True)  # fmt: skip
    cfg = dataclasses.replace(CFG, moe=moe)
    gen = torch.Generator().manual_seed(n_groups)
    ours = Router(cfg, moe).eval()
    theirs = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter(
        transformers.Glm4MoeConfig(hidden_size=48, n_routed_experts=24, num_experts_per_tok=4, n_group=n_groups,
                                   topk_group=topk_groups, norm_topk_prob=renormalize, routed_scaling_factor=scale)
    )  # fmt: skip
    with torch.no_grad():
        ours.gate.weight.copy_(torch.randn(24, 48, generator=gen) * 0.3)
        ours.expert_bias.copy_(torch.randn(24, generator=gen) * 0.2)
        theirs.weight.copy_(ours.gate.weight)
        theirs.e_score_correction_bias.copy_(ours.expert_bias)
    x = torch.randn(512, 48, generator=gen)
    with torch.no_grad():
        routing = ours(x)
        _, weights, experts = theirs(x)
    assert _margins(ours, routing.logits) > 1e-6 or n_groups == 1
    mine, order = routing.experts.sort(dim=-1)
    hf_experts, hf_order = experts.sort(dim=-1)
    assert torch.equal(mine, hf_experts)
    torch.testing.assert_close(
        routing.weights.gather(-1, order), weights.gather(-1, hf_order), rtol=1e-6, atol=1e-7
    )
    unbiased = Router(cfg, dataclasses.replace(moe, expert_bias=False))
    unbiased.load_state_dict({"gate.weight": ours.gate.weight}, strict=True)
    assert not torch.equal(unbiased(x).experts.sort(dim=-1).values, mine)  # the bias does steer selection


def test_parameter_count_equals_transformers() -> None:
    for cfg in (
        CFG,
        dataclasses.replace(CFG, bias=False, bias_scope="all", qk_norm=False, tie_embeddings=True),
    ):
        hf = build_hf_model(cfg)
        assert param_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def test_a_router_without_selection_bias_exports_zeros(tmp_path: Path) -> None:
    assert CFG.moe is not None
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, expert_bias=False))
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["model.layers.1.mlp.gate.e_score_correction_bias"], torch.zeros(6))
    ids = _ids(6)
    with torch.no_grad():
        assert (model(ids) - _logits(_load(tmp_path), ids)).abs().max() <= TOL
    imported, _ = read_hf(tmp_path)
    assert imported == CFG  # an import keeps the (zero) selection bias as a buffer


def test_import_of_the_hub_config_fields() -> None:
    """GLM-4.5-Air's config.json fields (shrunk widths; partial_rotary_factor left to transformers' default)."""
    hf = transformers.Glm4MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                    moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                                    n_group=1, topk_group=1, attention_bias=True, max_position_embeddings=64,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})  # fmt: skip
    cfg = config_from_hf(hf)
    assert (cfg.rope_fraction, cfg.bias, cfg.bias_scope, cfg.qk_norm, cfg.head_dim) == (
        0.5,
        True,
        "qkv",
        False,
        16,
    )
    assert cfg.moe == MoEConfig(n_experts=8, top_k=2, expert_hidden=24, n_shared_experts=1, first_dense=1,
                                router="sigmoid", renormalize=True, aux_loss=0.0, expert_bias=True)  # fmt: skip
    assert hf_family(cfg) == "glm4_moe"


def test_family_rule_takes_glm_attention_only() -> None:
    assert CFG.moe is not None
    assert hf_family(dataclasses.replace(CFG, bias=False, bias_scope="all")) == "glm4_moe"  # partial RoPE
    assert hf_family(dataclasses.replace(CFG, rope_fraction=1.0)) == "glm4_moe"  # q/k/v biases
    # DeepSeek-V3 routing on full-rotary, bias-free attention is not GLM's (and stays refused)
    plain = dataclasses.replace(CFG, bias=False, bias_scope="all", rope_fraction=1.0)
    assert hf_family(plain) != "glm4_moe"
    deepseek = load_recipe(RECIPES / "deepseek-v3-style-16b.yaml").model
    assert hf_family(deepseek) != "glm4_moe"
    softmax = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, router="softmax"))
    assert hf_family(softmax) != "glm4_moe"


def _moe(**fields: object) -> ModelConfig:
    assert CFG.moe is not None
    return dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **fields))


@pytest.mark.parametrize(
    ("cfg", "fields"),
    [
        (_moe(n_shared_experts=0), ["model.moe.n_shared_experts=0"]),
        (_moe(shared_expert_hidden=24), ["model.moe.shared_expert_hidden=24"]),
        (_moe(shared_expert_gate=True), ["model.moe.shared_expert_gate=True"]),
        (_moe(every=2), ["model.moe.every=2"]),
        (_moe(capacity_factor=1.5, jitter=0.1), ["model.moe.capacity_factor=1.5", "model.moe.jitter=0.1"]),
        (_moe(n_groups=6, topk_groups=3), ["model.moe.n_groups=6"]),  # one expert per group
        (dataclasses.replace(CFG, bias_scope="all"), ["model.bias_scope='all'"]),
        (dataclasses.replace(CFG, sliding_window=5), ["model.sliding_window=5"]),
        (
            dataclasses.replace(CFG, rope_scaling="linear", rope_scaling_factor=2.0),
            ["model.rope_scaling='linear'"],
        ),
    ],
    ids=[
        "no-shared",
        "shared-width",
        "gated-shared",
        "every",
        "capacity",
        "groups-of-one",
        "bias-all",
        "window",
        "rope-scaling",
    ],  # fmt: skip
)
def test_settings_transformers_does_not_compute_are_refused(cfg: ModelConfig, fields: list[str]) -> None:
    if (
        "model.bias_scope='all'" in fields
    ):  # MoE with biases on o_proj and the MLPs is not a Loom model either
        with pytest.raises(ConfigError, match="bias_scope: qkv"):
            cfg.validate()
    else:
        cfg.validate()  # a valid Loom model, only not representable
    with pytest.raises(ConfigError) as refusal:
        check_representable(cfg)
    assert all(f in refusal.value.rule for f in fields), refusal.value.rule


def test_mtp_layers_are_dropped_and_a_missing_tensor_is_named(tmp_path: Path) -> None:
    """A multi-token-prediction layer (model.layers.{num_hidden_layers}) beyond the depths config.json declares
    (num_nextn_predict_layers 0 here) is skipped, as transformers skips them all."""
    save_hf(CFG, _model().state_dict(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    mtp = {
        "model.layers.3.eh_proj.weight": torch.ones(48, 96),
        "model.layers.3.mlp.gate.weight": torch.ones(6, 48),
    }
    save_file(weights | mtp, tmp_path / "model.safetensors")
    cfg, state = read_hf(tmp_path)
    assert cfg == CFG and not any(k.startswith("layers.3.") for k in state)
    del weights["model.layers.2.mlp.gate.e_score_correction_bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.mlp\.gate\.e_score_correction_bias"):
        read_hf(tmp_path)


def test_cli_export_import_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loom convert` both ways from a training checkpoint whose router balances itself (bias_update_rate): the
    trained selection bias goes out as e_score_correction_bias and comes back as a fixed buffer (the update
    rate is a training rule config.json has no field for), the MTP depth goes and comes back, every weight bit
    for bit."""
    assert CFG.moe is not None
    moe = dataclasses.replace(CFG.moe, expert_bias=False, bias_update_rate=1e-3)
    cfg = dataclasses.replace(
        CFG, vocab_size=4100, moe=moe, mtp=MTPConfig(depth=1)
    )  # the demo tokenizer's ids
    monkeypatch.setattr(
        convert_cli, "random_model", lambda c, seed: _model(seed, c)
    )  # a trained-looking bias
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model", seed=1)
    assert model.state_dict()["layers.1.feed_forward.router.expert_bias"].abs().min() > 0
    code, out, err = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "hf")
    assert code == 0, err
    assert "with the 1 multi-token prediction depth(s)" in out, out
    ids = torch.randint(0, 4100, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids) - _logits(_load(tmp_path / "hf"), ids)).abs().max() <= TOL
    code, _, err = run(capsys, "convert", tmp_path / "hf", "--from", "hf", tmp_path / "back")
    assert code == 0, err
    fixed = dataclasses.replace(moe, expert_bias=True, bias_update_rate=0.0)
    assert load_recipe(tmp_path / "back" / "recipe.yaml").model == dataclasses.replace(cfg, moe=fixed)
    _, state = read_hf(tmp_path / "hf")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


HUB_AIR = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
           "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "partial_rotary_factor": 0.5,
           "intermediate_size": 10944, "max_position_embeddings": 131072, "moe_intermediate_size": 1408,
           "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
           "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
           "num_hidden_layers": 46, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "use_qk_norm": False,
           "vocab_size": 151552}  # fmt: skip
"""zai-org/GLM-4.5-Air's config.json (its architecture fields, in the pre-transformers-5 layout: RoPE at the top)."""


def test_the_recipe_is_the_hub_config(tmp_path: Path) -> None:
    """recipes/glm-4.5-air-style.yaml's model is what importing GLM-4.5-Air's config.json gives, but for the
    balancing rules of training (config.json has none)."""
    from framework.convert.hf.importer import _hf_config

    (tmp_path / "config.json").write_text(json.dumps(HUB_AIR))
    imported = config_from_hf(_hf_config(tmp_path / "config.json"))
    recipe = load_recipe(RECIPES / "glm-4.5-air-style.yaml").model
    assert recipe.moe is not None and imported.moe is not None
    rules = {
        k: getattr(recipe.moe, k) for k in ("aux_loss", "aux_loss_scope", "bias_update_rate", "expert_bias")
    }
    assert imported.mtp == MTPConfig(
        depth=1
    )  # declared; the recipe trains without MTP (transformers has none)
    assert dataclasses.replace(imported, moe=dataclasses.replace(imported.moe, **rules), mtp=None) == recipe


MTP_CFG = dataclasses.replace(CFG, mtp=MTPConfig(depth=1))


def test_mtp_depth_exports_as_the_hub_layer_and_matches_transformers_mtp_model(tmp_path: Path) -> None:
    """model.mtp depth 1 goes out as HF layer 3 (an MoE block, enorm / hnorm / eh_proj / shared_head.norm, and
    copies of the embedding and head), comes back bit for bit, and its logits equal transformers' MtpModel (the
    oracle) holding the exported layer: same h^0 (the main stack after its final norm), ids shifted by one."""
    from transformers.modeling_layers import MtpModel

    from framework.convert.hf import experts, glm4_moe
    from framework.train.mtp_loss import take_mtp_logits

    model = _model(cfg=MTP_CFG)
    save_hf(MTP_CFG, model.state_dict(), tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert torch.equal(files["model.layers.3.eh_proj.weight"], model.state_dict()["mtp.0.eh_proj.weight"])
    assert torch.equal(files["model.layers.3.shared_head.head.weight"], model.state_dict()["output.weight"])
    assert (
        "model.layers.3.embed_tokens.weight" in files
        and "model.layers.3.mlp.experts.5.up_proj.weight" in files
    )
    cfg_back, state_back = read_hf(tmp_path)
    assert cfg_back == MTP_CFG and state_back.keys() == model.state_dict().keys()
    assert all(torch.equal(state_back[k], v) for k, v in model.state_dict().items())

    main = _load(tmp_path)  # transformers' causal LM leaves layer 3 unread
    ids = _ids(7)
    assert (_routed(model, ids) - _logits(main, ids)).abs().max() <= TOL
    oracle = MtpModel(main, 1).eval()
    layer = {k.removeprefix("model.layers.3."): v for k, v in experts.from_files(files, glm4_moe.FILES, MTP_CFG).items()
             if k.startswith("model.layers.3.")}  # fmt: skip
    extra = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
    ours = {f"layers.0.{k}" if k in extra else f"layers.0.mtp_block.{k}": v for k, v in layer.items()
            if k not in ("shared_head.norm.weight", "embed_tokens.weight", "shared_head.head.weight")}  # fmt: skip
    ours["layers.0.post_norm.weight"] = layer["shared_head.norm.weight"]
    missing, unexpected = oracle.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "shared_head.weight"}
    model.train()  # dropout 0: train mode only adds the MTP logits
    with torch.no_grad():
        _routed(model, ids)
        (got,) = take_mtp_logits(model)
        h0 = _final_norm_output(model.eval(), ids)
        positions = torch.arange(SEQ)[None].expand(2, -1)
        h1 = oracle.forward_layer(0, h0, positions, None, input_ids=torch.roll(ids, -1, dims=1))
        expected = oracle._project_to_logits(h1)
    diff = (got - expected).abs().max().item()
    print(f"glm4_moe: MTP depth max |logit diff| = {diff:.2e}")
    assert expected.std() > 0.1 and diff <= TOL


def _final_norm_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda m, a, out: seen.append(out))
    model(ids)
    handle.remove()
    return seen[0]


def test_declared_mtp_layers_the_weights_lack_are_not_imported(tmp_path: Path) -> None:
    """transformers' save_pretrained writes no MTP layer even when num_nextn_predict_layers says 1."""
    hf_config = build_hf_model(MTP_CFG).config
    assert hf_config.num_nextn_predict_layers == 1
    torch.manual_seed(0)
    transformers.Glm4MoeForCausalLM(hf_config).save_pretrained(tmp_path)
    cfg, state = read_hf(tmp_path)
    assert cfg.mtp is None and not any(k.startswith("mtp.") for k in state)
    assert config_from_hf(hf_config).mtp == MTPConfig(depth=1)  # the config alone declares it
