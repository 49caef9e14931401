"""Multi-head Latent Attention against an independent reference written here from DeepSeek-V2's equations, and YaRN
against transformers' own rope function.

The reference materialises per-head keys k_h = [W_uk,h kv_norm(c), RoPE(k_rope)] and values v_h = W_uv,h kv_norm(c)
from the module's weights, scores q_h . k_h times the softmax scale, masks (causal, window, documents) and
softmaxes: nothing of framework/models/attention.py is used.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from framework.config.errors import ConfigError
from framework.config.schema import LayersConfig, MLAConfig, ModelConfig
from framework.models import build_model
from framework.models.attention import AttentionContext
from framework.models.flops import param_counts
from framework.models.masks import AttentionMask
from framework.models.mla import MLA, mla_softmax_scale
from framework.models.positions import rope_angles, rope_attention_factor, rope_inv_freq

WIDTHS = {"kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 5}


def config(q_lora: int | None = 10, **overrides) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=40, d_model=32, n_layers=2, n_heads=5, ffn_hidden=48, max_seq_len=64,
        layers=LayersConfig(pattern=["mla"]), mla=MLAConfig(q_lora_rank=q_lora, **WIDTHS),
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_pairs(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float
) -> torch.Tensor:
    """RoPE on channel pairs (2i, 2i+1) by angle p * inv_freq[i], cos and sin scaled by YaRN's factor."""
    angle = positions[..., None].float() * inv_freq  # [B, S, rope / 2]
    cos, sin = (angle.cos() * factor)[:, :, None], (angle.sin() * factor)[:, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def reference(layer: MLA, cfg: ModelConfig, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 eqs. 1-11 with the expanded keys and values; allowed [B, S, S] bool."""
    m, h, eps = cfg.mla, cfg.n_heads, 1e-6  # DeepSeek's latent-norm eps
    b, s, _ = x.shape
    if m.q_lora_rank is None:
        q = x @ layer.wq.weight.T
    else:
        q = rms(x @ layer.wq_a.weight.T, layer.q_norm.weight, eps) @ layer.wq_b.weight.T
    q = q.view(b, s, h, m.qk_nope_head_dim + m.qk_rope_head_dim)
    down = x @ layer.wkv_a.weight.T
    latent, k_rope = down[..., : m.kv_lora_rank], down[..., m.kv_lora_rank :]
    up = (rms(latent, layer.kv_norm.weight, eps) @ layer.wkv_b.weight.T).view(b, s, h, -1)
    k_nope, v = up[..., : m.qk_nope_head_dim], up[..., m.qk_nope_head_dim :]
    positions = torch.arange(s).expand(b, s)
    inv_freq, factor = rope_inv_freq(cfg), rope_attention_factor(cfg)
    q_rope = rotate_pairs(q[..., m.qk_nope_head_dim :], positions, inv_freq, factor)
    k_rope = rotate_pairs(k_rope[:, :, None], positions, inv_freq, factor).expand(b, s, h, -1)
    q = torch.cat((q[..., : m.qk_nope_head_dim], q_rope), -1)
    k = torch.cat((k_nope, k_rope), -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * mla_softmax_scale(cfg)
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)
    return out @ layer.wo.weight.T


def allowed_keys(b: int, s: int, window: int | None, documents: torch.Tensor | None) -> torch.Tensor:
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    ok = (j <= i) & ((i - j < window) if window is not None else True)
    ok = ok.expand(b, s, s)
    if documents is not None:
        ok = ok & (documents[:, :, None] == documents[:, None, :])
    return ok


def context(cfg: ModelConfig, b: int, s: int, window: int | None, documents: torch.Tensor | None):
    positions = torch.arange(s).expand(b, s)
    mask = AttentionMask(causal=True, window=window, q_documents=documents, k_documents=documents)
    return AttentionContext(mask, positions=positions, rope=rope_angles(cfg, positions))


CASES = {
    "q_lora": ({}, None, False),
    "no_q_lora": ({"q_lora": None}, None, False),
    "window_documents": ({}, 4, True),
    "yarn": ({"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_original_max_seq_len": 8,
              "rope_yarn_mscale": 1.0, "rope_yarn_mscale_all_dim": 0.8}, None, False),
}  # fmt: skip


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flex"])
@pytest.mark.parametrize("case", list(CASES))
def test_mla_matches_the_reference(case: str, backend: str) -> None:
    overrides, window, with_documents = CASES[case]
    q_lora = overrides.pop("q_lora", 10) if "q_lora" in overrides else 10
    cfg = config(q_lora, attention_backend=backend, **{k: v for k, v in overrides.items() if k != "q_lora"})
    torch.manual_seed(0)
    layer = MLA(cfg)
    for p in layer.parameters():  # norms away from 1, so a skipped norm shows
        torch.nn.init.normal_(p, std=0.3)
    b, s = 2, 12
    x = torch.randn(b, s, cfg.d_model)
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if with_documents else None
    want = reference(layer, cfg, x, allowed_keys(b, s, window, documents))
    with torch.set_grad_enabled(backend != "flex"):  # eager Flex has no backward on CPU
        got = layer(x, context(cfg, b, s, window, documents))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    if backend != "flex":
        got.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_sdpa_pads_to_one_head_width_and_keeps_gradients() -> None:
    """The SDPA path zero-pads v to the q/k width (flash kernels need one width): gradients equal the naive
    backend's."""
    grads = {}
    for backend in ("naive", "sdpa"):
        cfg = config(attention_backend=backend)
        torch.manual_seed(0)
        layer = MLA(cfg)
        x = torch.randn(2, 10, cfg.d_model, requires_grad=True)
        layer(x, context(cfg, 2, 10, None, None)).square().sum().backward()
        grads[backend] = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(grads["naive"], grads["sdpa"], strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize(
    "rope",
    [
        {"factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
         "original_max_position_embeddings": 4096},  # DeepSeek-V3
        {"factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.5,
         "original_max_position_embeddings": 64},
        {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 4096},  # gpt-oss
    ],
)  # fmt: skip
def test_yarn_matches_transformers(rope: dict) -> None:
    dim, theta = 64, 10000.0
    hf = PretrainedConfig()
    hf.hidden_size, hf.num_attention_heads, hf.head_dim, hf.max_position_embeddings = 512, 8, dim, 131072
    hf.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, **rope}
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cfg = ModelConfig(
        d_model=512, n_heads=8, head_dim=dim, rope_theta=theta, rope_scaling="yarn",
        rope_scaling_factor=rope["factor"], rope_original_max_seq_len=rope["original_max_position_embeddings"],
        rope_yarn_beta_fast=rope["beta_fast"], rope_yarn_beta_slow=rope["beta_slow"],
        rope_yarn_mscale=rope.get("mscale"), rope_yarn_mscale_all_dim=rope.get("mscale_all_dim"),
        rope_yarn_truncate=rope.get("truncate", True),
    )  # fmt: skip
    assert torch.allclose(rope_inv_freq(cfg), want_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(rope_attention_factor(cfg), want_factor, rel_tol=1e-12)


def test_softmax_scale_is_deepseeks() -> None:
    """(nope + rope)^-1/2 times (0.1 mscale_all_dim ln(factor) + 1)^2 under yarn (DeepSeek-V3's attention)."""
    cfg = config(rope_scaling="yarn", rope_scaling_factor=40.0, rope_yarn_mscale_all_dim=1.0)
    assert math.isclose(mla_softmax_scale(cfg), 10**-0.5 * (0.1 * math.log(40.0) + 1) ** 2)
    assert math.isclose(mla_softmax_scale(config()), 10**-0.5)


@pytest.mark.parametrize("q_lora", [10, None])
def test_parameter_count_is_the_modules(q_lora: int | None) -> None:
    for bias in (False, True):
        cfg = config(q_lora, bias=bias)
        model = build_model(cfg)
        assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_an_mla_block_needs_its_section() -> None:
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(config(), mla=None, d_model=40).validate()  # 40: d_model rules pass
    assert err.value.key == "model.layers.pattern[0]" and "model.mla" in err.value.fix


@pytest.mark.parametrize(
    ("key", "value"),
    [("kv_heads", 1), ("qk_norm", True), ("attention_gate", True), ("learned_temperature", True),
     ("soft_distance_bias", True), ("rope_fraction", 0.5), ("position", "alibi")],
)  # fmt: skip
def test_attention_options_mla_lacks_are_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        config(**{key: value})
    assert err.value.key == f"model.{key}" and err.value.fix
