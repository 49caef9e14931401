"""Attention (every backend, mask and score bias) against a naive softmax reference written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_module

from framework.config.schema import ModelConfig
from framework.models import attention as attention_module
from framework.models.attention import Attention, AttentionContext
from framework.models.masks import AttentionMask

BACKENDS = ["naive", "sdpa", "flex"]
B, S, HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 2, 9, 4, 2, 8, 24
DOCS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2], [3, 3, 4, 4, 4, 4, 4, 4, 4]])
DOC_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
PREFIX = torch.tensor([4, 6])
WINDOW = 3


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run FlexAttention's reference path directly instead of through a dynamo trace per new score_mod
    (~1 s each on CPU): the same dense math, forward only, without the tracing cost."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


# ------------------------------------------------------------------------------------------------ reference


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax((scale q.k + bias) / T) v with masked logits -inf; q [B, H, S, D], k/v [B, Hkv, S, D]."""
    heads = q.shape[1]
    kv_head = torch.arange(heads) // (heads // k.shape[1])  # query head h reads kv head h // group size
    k, v = k[:, kv_head], v[:, kv_head]
    logits = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    if bias is not None:
        logits = logits + bias
    if temperature is not None:
        logits = logits / temperature.view(1, -1, 1, 1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)


def reference_mask(kind: str) -> torch.Tensor | None:
    """[B, S, S] allowed (query i, key j), written pair by pair."""
    if kind == "bidirectional":
        return None
    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(S):
                same_doc = bool(DOCS[b, i] == DOCS[b, j])
                allowed[b, i, j] = {
                    "causal": j <= i,
                    "prefix": j <= i or j < PREFIX[b],
                    "window": i - WINDOW < j <= i,
                    "document": j <= i and same_doc,
                    "document_bidirectional": same_doc,
                    "window_document": i - WINDOW < j <= i and same_doc,
                }[kind]
    return allowed


def mask_under_test(kind: str) -> AttentionMask:
    docs = {"q_documents": DOCS, "k_documents": DOCS}
    return {
        "bidirectional": AttentionMask(),
        "causal": AttentionMask(causal=True),
        "prefix": AttentionMask(causal=True, prefix_lengths=PREFIX),
        "window": AttentionMask(causal=True, window=WINDOW),
        "document": AttentionMask(causal=True, **docs),
        "document_bidirectional": AttentionMask(**docs),
        "window_document": AttentionMask(causal=True, window=WINDOW, **docs),
    }[kind]


MASKS = [
    "bidirectional",
    "causal",
    "prefix",
    "window",
    "document",
    "document_bidirectional",
    "window_document",
]


def make_attention(backend: str, **overrides: object) -> Attention:
    fields = dict(
        d_model=D_MODEL, n_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, attention_backend=backend
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return Attention(ModelConfig(**fields))


def project(attn: Attention, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """q, k, v as [B, heads, S, head_dim] from explicit matmuls with the module's weights."""
    source = x if memory is None else memory

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1, HEAD_DIM).transpose(1, 2)

    return heads(x @ attn.wq.weight.T), heads(source @ attn.wk.weight.T), heads(source @ attn.wv.weight.T)


def output(attn: Attention, heads_out: torch.Tensor) -> torch.Tensor:
    return heads_out.transpose(1, 2).reshape(heads_out.shape[0], heads_out.shape[2], -1) @ attn.wo.weight.T


def run(attn: Attention, x: torch.Tensor, ctx: AttentionContext, backend: str) -> torch.Tensor:
    if backend == "flex":  # FlexAttention has no CPU backward: forward only
        with torch.no_grad():
            return attn(x, ctx)
    return attn(x, ctx)


def distance(positions: torch.Tensor) -> torch.Tensor:
    """|p_i - p_j| as [B, 1, S, S]."""
    return (positions[:, None, :, None] - positions[:, None, None, :]).abs().float()


# ----------------------------------------------------------------------------------------------- mask types


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASKS)
def test_masks_match_reference(backend: str, kind: str) -> None:
    attn = make_attention(backend)
    x = torch.randn(B, S, D_MODEL)
    got = run(attn, x, AttentionContext(mask_under_test(kind)), backend)
    q, k, v = project(attn, x)
    expected = reference_attention(q, k, v, scale=HEAD_DIM**-0.5, allowed=reference_mask(kind))
    torch.testing.assert_close(got, output(attn, expected), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- score biases


def _alibi_case(attn: Attention, positions: torch.Tensor) -> tuple[torch.Tensor, None]:
    slopes = torch.tensor([2.0 ** (-8 / HEADS * (h + 1)) for h in range(HEADS)])  # Press et al., 2^(-8/n)
    return -slopes.view(1, -1, 1, 1) * distance(positions), None


def _soft_case(attn: Attention, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        attn.distance_weight.copy_(torch.tensor([0.0, 0.3, 1.0, 2.5]))
        attn.log_temperature.copy_(torch.tensor([0.0, -0.5, 0.7, 0.2]))
    bias = -attn.distance_weight.detach().view(1, -1, 1, 1) * distance(positions)
    return bias, attn.log_temperature.detach().exp()


BIAS_CASES = {
    "alibi": (dict(position="alibi"), _alibi_case),
    "soft": (dict(soft_distance_bias=True, learned_temperature=True), _soft_case),
    "temperature": (dict(attention_temperature=0.4), lambda a, p: (None, torch.full((HEADS,), 0.4))),
    "relative": (dict(position="relative_bias"), None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "window_document"])
@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_score_biases_match_reference(backend: str, kind: str, case: str) -> None:
    overrides, make_bias = BIAS_CASES[case]
    attn = make_attention(backend, **overrides)
    positions = DOC_POSITIONS if "document" in kind else torch.arange(S).expand(B, S)
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(mask_under_test(kind), positions=positions)
    if case == "relative":
        ctx.position_bias = torch.randn(1, HEADS, S, S)
        bias, temperature = ctx.position_bias, None
    else:
        bias, temperature = make_bias(attn, positions)
    got = run(attn, x, ctx, backend)
    q, k, v = project(attn, x)
    expected = reference_attention(
        q, k, v, scale=HEAD_DIM**-0.5, allowed=reference_mask(kind), bias=bias, temperature=temperature
    )
    torch.testing.assert_close(got, output(attn, expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_masking_at_init_is_plain_attention(backend: str) -> None:
    soft = make_attention(backend, soft_distance_bias=True, learned_temperature=True)
    plain = make_attention(backend)
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(AttentionMask(causal=True), positions=torch.arange(S).expand(B, S))
    got, expected = run(soft, x, ctx, backend), run(plain, x, ctx, backend)
    if backend == "naive":
        assert torch.equal(got, expected)  # + (-0 * |i - j|) and * exp(-0) are exact no-ops
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- heads and scaling


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(backend: str, kv_heads: int) -> None:
    gqa = make_attention(backend, kv_heads=kv_heads)
    mha = make_attention(backend, kv_heads=HEADS)
    group = HEADS // kv_heads
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            per_head = getattr(gqa, name).weight.view(kv_heads, HEAD_DIM, D_MODEL)
            getattr(mha, name).weight.copy_(per_head.repeat_interleave(group, dim=0).reshape(-1, D_MODEL))
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(AttentionMask(causal=True))
    torch.testing.assert_close(run(gqa, x, ctx, backend), run(mha, x, ctx, backend), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "value"), [("inv_sqrt_dk", 16**-0.5), ("none", 1.0), (0.05, 0.05)])
def test_softmax_scale_and_independent_head_dim(backend: str, scale: str | float, value: float) -> None:
    attn = make_attention(backend, d_model=12, n_heads=3, kv_heads=3, head_dim=16, softmax_scale=scale)
    assert attn.wq.weight.shape == (48, 12) and attn.wo.weight.shape == (12, 48)
    x = torch.randn(B, S, 12)
    got = run(attn, x, AttentionContext(AttentionMask(causal=True)), backend)
    q = (x @ attn.wq.weight.T).view(B, S, 3, 16).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, S, 3, 16).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, S, 3, 16).transpose(1, 2)
    expected = reference_attention(q, k, v, scale=value, allowed=reference_mask("causal"))
    torch.testing.assert_close(got, output(attn, expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_and_rope_inside_attention(backend: str) -> None:
    attn = make_attention(backend, qk_norm=True, norm_eps=1e-6)
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
    positions = torch.arange(S).expand(B, S)
    angles = positions[..., None].double() * torch.tensor([10000 ** (-2 * i / HEAD_DIM) for i in range(4)])
    ctx = AttentionContext(
        AttentionMask(causal=True), rope=(angles.cos()[:, :, None].float(), angles.sin()[:, :, None].float())
    )
    x = torch.randn(B, S, D_MODEL)
    got = run(attn, x, ctx, backend)
    q, k, v = project(attn, x)

    def rms_then_rotate(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # per-head RMSNorm
        pairs = torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2).contiguous())
        rotated = pairs * torch.polar(torch.ones(1, dtype=torch.float64), angles)[:, None]
        return torch.view_as_real(rotated).flatten(-2).float()

    q, k = rms_then_rotate(q, attn.q_norm.weight.detach()), rms_then_rotate(k, attn.k_norm.weight.detach())
    expected = reference_attention(q, k, v, scale=HEAD_DIM**-0.5, allowed=reference_mask("causal"))
    torch.testing.assert_close(got, output(attn, expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_reads_memory_without_mask(backend: str) -> None:
    attn = make_attention(backend)
    x, memory = torch.randn(B, 5, D_MODEL), torch.randn(B, 7, D_MODEL)
    with torch.no_grad() if backend == "flex" else torch.enable_grad():
        got = attn(x, AttentionContext(), memory)
    q, k, v = project(attn, x, memory)
    torch.testing.assert_close(
        got, output(attn, reference_attention(q, k, v, scale=HEAD_DIM**-0.5)), atol=1e-5, rtol=1e-4
    )


# -------------------------------------------------------------------------------- tensor-parallel head shards


def _shard(full: Attention, cfg: ModelConfig, first: int, count: int) -> Attention:
    """Heads first .. first+count-1 of `full` in a module that still knows the global head count."""
    part = Attention(cfg)
    kv_first, kv_count = first * KV_HEADS // HEADS, count * KV_HEADS // HEADS
    with torch.no_grad():
        part.wq.weight = torch.nn.Parameter(
            full.wq.weight[first * HEAD_DIM : (first + count) * HEAD_DIM].clone()
        )
        for name in ("wk", "wv"):
            rows = getattr(full, name).weight[kv_first * HEAD_DIM : (kv_first + kv_count) * HEAD_DIM]
            getattr(part, name).weight = torch.nn.Parameter(rows.clone())
        part.wo.weight = torch.nn.Parameter(
            full.wo.weight[:, first * HEAD_DIM : (first + count) * HEAD_DIM].clone()
        )
    part.head_offset = first
    return part


@pytest.mark.parametrize("position", ["alibi", "relative_bias"])
def test_head_shards_use_global_head_index(position: str) -> None:
    cfg = ModelConfig(d_model=D_MODEL, n_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, position=position)
    torch.manual_seed(0)
    full = Attention(cfg)
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(AttentionMask(causal=True), positions=torch.arange(S).expand(B, S))
    if position == "relative_bias":
        ctx.position_bias = torch.randn(1, HEADS, S, S)
    # row-parallel wo: the full output is the sum of the shards' outputs
    summed = _shard(full, cfg, 0, 2)(x, ctx) + _shard(full, cfg, 2, 2)(x, ctx)
    torch.testing.assert_close(summed, full(x, ctx), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- kernel choice


def test_sdpa_uses_is_causal_only_for_plain_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    original = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    x = torch.randn(B, S, D_MODEL)
    make_attention("sdpa", attention_temperature=2.0)(x, AttentionContext(AttentionMask(causal=True)))
    assert calls[-1]["is_causal"] is True and calls[-1]["attn_mask"] is None
    assert calls[-1]["enable_gqa"] is True
    positions = torch.arange(S).expand(B, S)
    make_attention("sdpa", position="alibi")(
        x, AttentionContext(AttentionMask(causal=True), positions=positions)
    )
    assert calls[-1]["is_causal"] is False and calls[-1]["attn_mask"].dtype == torch.float32
    make_attention("sdpa")(x, AttentionContext(mask_under_test("window")))
    assert calls[-1]["is_causal"] is False and calls[-1]["attn_mask"].dtype == torch.bool


# ------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_attention_dropout_only_in_training(backend: str) -> None:
    attn = make_attention(backend, attention_dropout=0.5)
    plain = make_attention(backend)
    x = torch.randn(B, S, D_MODEL)
    ctx = AttentionContext(AttentionMask(causal=True))
    attn.eval()
    torch.testing.assert_close(attn(x, ctx), plain(x, ctx))
    attn.train()
    assert not torch.allclose(attn(x, ctx), plain(x, ctx))


def test_flex_rejects_attention_dropout_in_training() -> None:
    attn = make_attention("flex", attention_dropout=0.1)
    with pytest.raises(NotImplementedError, match="dropout"), torch.no_grad():
        attn(torch.randn(1, 4, D_MODEL), AttentionContext(AttentionMask(causal=True)))


def test_reference_is_sane() -> None:
    # one query, two keys with equal scores -> the mean of the values
    q = torch.zeros(1, 1, 1, 2)
    k = torch.ones(1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [3.0, 2.0]]]])
    assert torch.equal(reference_attention(q, k, v, scale=1.0), torch.tensor([[[[2.0, 1.0]]]]))
