"""Attention sinks (gpt-oss): every backend against a reference written here from the definition
p_ij = exp(l_ij) / (sum_k exp(l_ik) + exp(sink_h)), and against transformers' gpt-oss eager attention."""

from __future__ import annotations

import pytest
import torch

from framework.config.schema import ModelConfig
from framework.models import attention as attention_module
from framework.models.attention import Attention, AttentionContext, attention_path, rescale_for_sinks
from framework.models.masks import AttentionMask
from tests.framework.models.test_attention import (
    D_MODEL,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    MASKS,
    B,
    S,
    eager_flex,  # noqa: F401 (autouse fixture)
    mask_under_test,
    output,
    project,
    reference_mask,
    run,
)

BACKENDS = ["naive", "sdpa", "flex"]


def sink_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    scale: float,
    allowed: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Each probability written as its own ratio: exp(l_ij) over (sum of the visible exp(l_ik) + exp(sink_h))."""
    kv_head = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    k, v = k[:, kv_head], v[:, kv_head]
    logits = scale * torch.einsum("bhid,bhjd->bhij", q, k).double() / temperature
    weights = logits.exp()
    if allowed is not None:
        weights = weights * allowed[:, None].double()
    denominator = weights.sum(-1, keepdim=True) + sinks.double().exp().view(1, -1, 1, 1)
    return torch.einsum("bhij,bhjd->bhid", weights / denominator, v.double()).to(q.dtype)


def make(backend: str, **overrides: object) -> Attention:
    cfg = dict(
        d_model=D_MODEL, n_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, attention_backend=backend
    )
    torch.manual_seed(0)
    attn = Attention(ModelConfig(**(cfg | {"attention_sinks": True} | overrides)))
    with torch.no_grad():  # distinct sinks per head, from "never attend" (-inf-like) to large
        attn.sinks.copy_(torch.tensor([-3.0, 0.0, 1.5, 4.0]))
    return attn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
def test_sinks_match_reference(backend: str, kind: str) -> None:
    attn = make(backend)
    x = torch.randn(B, S, D_MODEL)
    got = run(attn, x, AttentionContext(mask_under_test(kind)), backend)
    q, k, v = project(attn, x)
    want = sink_reference(q, k, v, attn.sinks.detach(), scale=HEAD_DIM**-0.5, allowed=reference_mask(kind))
    torch.testing.assert_close(got, output(attn, want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_sink_gradients_match_reference(backend: str) -> None:
    """The sinks (and q/k/v) get the reference's gradients: the SDPA extra-key trick is differentiable exactly."""
    attn = make(backend, attention_temperature=1.7)
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    attn(x, AttentionContext(mask_under_test("window_document"))).square().sum().backward()
    got = (attn.sinks.grad.clone(), x.grad.clone())
    attn.zero_grad()
    x.grad = None
    q, k, v = project(attn, x)
    allowed = reference_mask("window_document")
    ref = sink_reference(q, k, v, attn.sinks, scale=HEAD_DIM**-0.5, allowed=allowed, temperature=1.7)
    output(attn, ref).square().sum().backward()
    torch.testing.assert_close(got[0], attn.sinks.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], x.grad, atol=1e-5, rtol=1e-5)


def test_very_negative_sinks_are_plain_attention() -> None:
    """sink -> -inf removes the extra denominator term: the same output as attention without sinks."""
    attn = make("sdpa")
    with torch.no_grad():
        attn.sinks.fill_(-1e4)
    plain = Attention(ModelConfig(d_model=D_MODEL, n_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM))
    plain.load_state_dict({n: p for n, p in attn.state_dict().items() if n != "sinks"})
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(AttentionMask(causal=True))
    torch.testing.assert_close(attn(x, ctx), plain(x, ctx), atol=1e-6, rtol=1e-5)


def test_rescale_for_sinks_is_the_sink_softmax() -> None:
    """out * sigmoid(lse - sink) from a plain softmax's output and log-sum-exp equals the sink softmax."""
    logits, values, sinks = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 7, 4), torch.randn(3)
    plain = logits.softmax(-1) @ values
    lse = logits.logsumexp(-1)
    column = sinks.view(1, 3, 1, 1).expand(2, 3, 5, 1)
    want = torch.cat([logits, column], -1).softmax(-1)[..., :-1] @ values
    torch.testing.assert_close(rescale_for_sinks(plain, lse, sinks), want)


def test_sinks_choose_flex_on_cuda_and_sdpa_elsewhere() -> None:
    common = dict(fused_sdpa=True, gqa=True, half=True, sinks=True)
    assert attention_path("sdpa", "cuda", dropout=False, **common) == "flex_compiled"
    assert attention_path("sdpa", "cuda", dropout=True, **common) == "sdpa_repeat_kv"
    assert attention_path("sdpa", "cpu", dropout=False, **common) == "sdpa"


def test_sinks_on_the_cuda_path_rescale_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routed as on CUDA (compiled Flex, here its eager function), the output still equals the reference."""
    monkeypatch.setattr(attention_module, "device_type", lambda t: "cuda")
    monkeypatch.setattr(attention_module, "compiled_flex_attention", lambda: attention_module.flex_attention)
    attn = make("sdpa")
    x = torch.randn(B, S, D_MODEL)
    with torch.no_grad():
        got = attn(x, AttentionContext(mask_under_test("document")))
    q, k, v = project(attn, x)
    want = sink_reference(q, k, v, attn.sinks, scale=HEAD_DIM**-0.5, allowed=reference_mask("document"))
    torch.testing.assert_close(got, output(attn, want.detach()), atol=2e-6, rtol=1e-5)


def test_sinks_match_transformers_gpt_oss_attention() -> None:
    """One gpt-oss attention layer of transformers (eager: the sink column concatenated to the logits) with
    the same weights and a sliding window, against Loom's on the SDPA path."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss import modeling_gpt_oss as hf

    hf_cfg = GptOssConfig(
        hidden_size=D_MODEL, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        sliding_window=3, layer_types=["sliding_attention"], num_hidden_layers=1, attention_bias=False,
    )  # fmt: skip
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    theirs = hf.GptOssAttention(hf_cfg, 0)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    attn = make("sdpa")
    attn.load_state_dict(
        {"wq.weight": theirs.q_proj.weight, "wk.weight": theirs.k_proj.weight, "wv.weight": theirs.v_proj.weight,
         "wo.weight": theirs.o_proj.weight, "sinks": theirs.sinks}, strict=False,
    )  # fmt: skip
    x = torch.randn(B, S, D_MODEL)
    ones, zeros = torch.ones(B, S, HEAD_DIM), torch.zeros(B, S, HEAD_DIM)  # RoPE off: cos 1, sin 0
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    allowed = (j <= i) & (i - j < 3)
    bias = torch.zeros(B, 1, S, S).masked_fill(~allowed, float("-inf"))
    want, _ = theirs(x, (ones[..., : HEAD_DIM // 2], zeros[..., : HEAD_DIM // 2]), bias)
    got = attn(x, AttentionContext(AttentionMask(causal=True, window=3)))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_on_cuda_match_the_naive_backend(dtype: torch.dtype) -> None:
    """The CUDA path (compiled FlexAttention, its log-sum-exp differentiated through rescale_for_sinks) against
    the naive reference on the same device: outputs and every gradient, sinks included, under a window mask."""
    device = torch.device("cuda")
    results = []
    for backend in ("sdpa", "naive"):
        attn = make(backend, head_dim=16).to(device)
        x = torch.randn(B, 64, D_MODEL, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        x.requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = attn(x, AttentionContext(AttentionMask(causal=True, window=16)))
        out.float().square().sum().backward()
        results.append((out.float(), attn.sinks.grad, x.grad.float()))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, **tol)
