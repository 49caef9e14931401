"""The ops Gemma and Gemma 2 add, against formulas written here and transformers' own modules: the (1 + w)
RMSNorm, sqrt(d_model) embedding scale, sandwich norms, final-logit and attention-score soft-capping (every
backend and the kernel each capped call is routed to)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import flex_attention
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm, GemmaTextScaledWordEmbedding

from framework.config.schema import ModelConfig
from framework.models import attention as attention_module
from framework.models import build_model, init_groups, init_weights
from framework.models.attention import AttentionContext, attention_path
from framework.models.masks import AttentionMask
from framework.models.norms import OffsetRMSNorm, RMSNorm, build_norm
from framework.models.transformer import embed
from tests.framework.models.test_attention import (
    BACKENDS,
    D_MODEL,
    HEAD_DIM,
    HEADS,
    B,
    S,
    make_attention,
    mask_under_test,
    output,
    project,
    reference_mask,
    run,
)

CAP = 0.8  # far below the scores' range here, so tanh is far from linear


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's reference math on CPU without a dynamo trace per score_mod (forward only)."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


# ------------------------------------------------------------------------------------------------ norms


def test_offset_rmsnorm_formula_and_zero_init() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3 + 1
    norm = OffsetRMSNorm(16, eps=1e-6)
    assert torch.equal(norm.weight, torch.zeros(16))  # gain 1 + 0: starts as a plain RMSNorm
    torch.testing.assert_close(norm(x), RMSNorm(16, eps=1e-6)(x))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_rmsnorm_equals_transformers_gemma_rmsnorm_bit_for_bit(dtype: torch.dtype) -> None:
    """bf16: the product is taken in fp32 and cast once (Llama's order, cast then multiply, differs)."""
    torch.manual_seed(1)
    ours, theirs = OffsetRMSNorm(64, eps=1e-6), GemmaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(8, 64) * 4).to(dtype)
    assert torch.equal(ours(x), theirs(x))
    if dtype == torch.bfloat16:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert not torch.equal(ours(x), normed * (1 + ours.weight))  # the two orders do round differently


def test_norm_weight_offset_builds_offset_norms_initialised_to_zero() -> None:
    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=4, ffn_hidden=32, max_seq_len=32,
                      norm_weight_offset=True, qk_norm=True, sandwich_norm=True)  # fmt: skip
    assert isinstance(build_norm(cfg), OffsetRMSNorm)
    model = build_model(cfg)
    init_weights(model, cfg, seed=0)
    names = init_groups(model, cfg)["offset_norms"][0]
    norms = [n for n, m in model.named_modules() if isinstance(m, RMSNorm)]
    assert sorted(names) == sorted(f"{n}.weight" for n in norms)
    assert len(norms) == 2 * (4 + 2) + 1  # per block: 4 sandwich norms and q/k norms; the final norm
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n in names)


# ----------------------------------------------------------------------------------------- embeddings


def test_embedding_scale_rounds_the_factor_to_the_compute_dtype_as_gemma_does() -> None:
    cfg = ModelConfig(vocab_size=37, d_model=48, n_layers=1, n_heads=4, ffn_hidden=32, max_seq_len=32,
                      embedding_scale="sqrt_d_model")  # fmt: skip
    model = build_model(cfg)
    ids = torch.randint(0, 37, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(embed(model, ids, positions), model.tok_embeddings.weight[ids] * math.sqrt(48))
    # bf16: sqrt(48) = 6.93 is rounded to 6.9375 before the multiply, exactly as transformers' Gemma does
    assert torch.tensor(48**0.5, dtype=torch.bfloat16).item() == 6.9375
    model = model.to(torch.bfloat16)
    theirs = GemmaTextScaledWordEmbedding(37, 48, padding_idx=0, embed_scale=48**0.5).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(model.tok_embeddings.weight)
    assert torch.equal(embed(model, ids, positions), theirs(ids))


# ------------------------------------------------------------------------------------- sandwich norms


def test_sandwich_block_formula() -> None:
    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=4, ffn_hidden=32, max_seq_len=32,
                      sandwich_norm=True, norm_weight_offset=True)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    block = model.layers["0"]
    ctx = AttentionContext(AttentionMask(causal=True), positions=torch.arange(5)[None])
    x = torch.randn(1, 5, 16)
    with torch.no_grad():  # x + post(f(pre(x))) for both branches
        h = x + block.attention_post_norm(block.attention(block.attention_norm(x), ctx))
        expected = h + block.ffn_post_norm(block.feed_forward(block.ffn_norm(h)))
        torch.testing.assert_close(block(x, ctx), expected)
    assert hasattr(model, "norm")


def test_sandwich_norm_needs_pre_norm() -> None:
    from framework.config.errors import ConfigError

    with pytest.raises(ConfigError, match="sandwich_norm"):
        ModelConfig(family="encoder", norm_position="post", sandwich_norm=True).validate()
    with pytest.raises(ConfigError, match="norm_weight_offset"):
        ModelConfig(norm="layernorm", norm_weight_offset=True).validate()
    with pytest.raises(ConfigError, match="attention_softcap"):
        ModelConfig(attention_softcap=0.0).validate()


# -------------------------------------------------------------------------------------- soft-capping


def test_final_logit_softcap_formula() -> None:
    fields = dict(
        vocab_size=37, d_model=16, n_layers=1, n_heads=4, ffn_hidden=32, max_seq_len=32, init_std=0.5
    )
    for tied in (False, True):
        plain = build_model(ModelConfig(**fields, tie_embeddings=tied)).eval()
        capped = build_model(ModelConfig(**fields, tie_embeddings=tied, final_logit_softcap=2.0)).eval()
        init_weights(plain, plain.cfg, 0)
        capped.load_state_dict(plain.state_dict())
        ids = torch.randint(0, 37, (2, 6))
        with torch.no_grad():
            raw, got = plain(ids), capped(ids)
        assert raw.abs().max() > 2.0  # the cap binds
        torch.testing.assert_close(got, 2.0 * torch.tanh(raw / 2.0))


def capped_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(CAP * tanh(scale q.k / CAP) + bias) v, masked logits -inf (Gemma 2's eager attention)."""
    kv_head = torch.arange(HEADS) // (HEADS // k.shape[1])
    k, v = k[:, kv_head], v[:, kv_head]
    logits = CAP * torch.tanh(HEAD_DIM**-0.5 * torch.einsum("bhid,bhjd->bhij", q, k) / CAP)
    if bias is not None:
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "window_document", "bidirectional"])
def test_attention_softcap_matches_reference(backend: str, kind: str) -> None:
    attn = make_attention(backend, attention_softcap=CAP)
    x = torch.randn(B, S, D_MODEL) * 3
    got = run(attn, x, AttentionContext(mask_under_test(kind)), backend)
    q, k, v = project(attn, x)
    assert (HEAD_DIM**-0.5 * q @ k[:, [0, 0, 1, 1]].transpose(-1, -2)).abs().max() > 3 * CAP  # the cap binds
    expected = output(attn, capped_reference(q, k, v, reference_mask(kind)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if backend != "flex":  # the gradient too (FlexAttention has no CPU backward)
        grad = torch.autograd.grad(got.square().sum(), attn.wq.weight)[0]
        want = torch.autograd.grad(expected.square().sum(), attn.wq.weight)[0]
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_softcap_comes_before_the_alibi_bias(backend: str) -> None:
    attn = make_attention(backend, attention_softcap=CAP, position="alibi")
    positions = torch.arange(S).expand(B, S)
    x = torch.randn(B, S, D_MODEL) * 3
    got = run(attn, x, AttentionContext(mask_under_test("causal"), positions=positions), backend)
    slopes = torch.tensor([2.0 ** (-8 / HEADS * (h + 1)) for h in range(HEADS)])
    dist = (positions[:, None, :, None] - positions[:, None, None, :]).abs().float()
    q, k, v = project(attn, x)
    expected = capped_reference(q, k, v, reference_mask("causal"), -slopes.view(1, -1, 1, 1) * dist)
    torch.testing.assert_close(got, output(attn, expected), atol=1e-5, rtol=1e-4)


FLAGS = [
    dict(fused_sdpa=f, dropout=d, gqa=g, half=h)
    for f in (0, 1)
    for d in (0, 1)
    for g in (0, 1)
    for h in (0, 1)
]


@pytest.mark.parametrize("case", FLAGS)
def test_capped_calls_never_reach_sdpa(case: dict) -> None:
    """No SDPA kernel caps scores: CUDA runs compiled Flex (a score_mod), except with dropout (Flex has none);
    CPU runs the naive reference (eager Flex has no CPU backward). The other backends are unchanged."""
    flags = {k: bool(v) for k, v in case.items()}
    cuda = attention_path("sdpa", "cuda", capped=True, **flags)
    assert cuda == ("naive" if flags["dropout"] else "flex_compiled")
    assert attention_path("sdpa", "cpu", capped=True, **flags) == "naive"
    assert attention_path("naive", "cuda", capped=True, **flags) == "naive"
    assert attention_path("flex", "cpu", capped=True, **flags) == "flex"
    assert attention_path("flex", "cuda", capped=True, **flags) == "flex_compiled"


def test_capped_attention_on_cuda_runs_compiled_flex_with_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    attn = make_attention("sdpa", attention_softcap=CAP)
    x = torch.randn(B, S, D_MODEL) * 3
    ctx = lambda: AttentionContext(mask_under_test("window_document"))  # noqa: E731
    with torch.no_grad():
        expected = attn(x, ctx())  # CPU: naive
    calls: list[dict] = []

    def spy_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append(kw)
        return flex_attention(q, k, v, **kw)

    monkeypatch.setattr(attention_module, "device_type", lambda t: "cuda")
    monkeypatch.setattr(attention_module, "compiled_flex_attention", lambda: spy_flex)
    monkeypatch.setattr(attention_module, "naive_attention", None)  # must not be reached
    with torch.no_grad():
        got = attn(x, ctx())
    assert len(calls) == 1 and calls[0]["score_mod"] is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_injected_kernel_refuses_the_cap() -> None:
    attn = make_attention("sdpa", attention_softcap=CAP)
    attn.kernel = lambda *args: pytest.fail("kernel called")
    with pytest.raises(NotImplementedError, match="attention_softcap"):
        attn(torch.randn(B, S, D_MODEL), AttentionContext(mask_under_test("causal")))


# ------------------------------------------------------------------------- per-layer sliding windows


def _windowed(**overrides: object) -> torch.nn.Module:
    fields = dict(
        vocab_size=37, d_model=16, n_layers=2, n_heads=4, ffn_hidden=32, max_seq_len=32, init_std=0.2
    )
    cfg = ModelConfig(**fields | overrides)
    model = build_model(cfg)
    init_weights(model, cfg, seed=0)
    return model.eval()


def test_full_attention_layers_drop_the_window_in_those_blocks_only() -> None:
    ids = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _windowed(sliding_window=3, full_attention_layers=[1])
    windows: dict[str, int | None] = {}
    for name, block in model.layers.items():
        hook = lambda m, args, name=name: windows.__setitem__(name, args[1].mask.window)  # noqa: E731
        block.register_forward_pre_hook(hook)
    with torch.no_grad():
        mixed = model(ids)
    assert windows == {"0": 3, "1": None}
    with torch.no_grad():
        windowed = _windowed(sliding_window=3)(ids)
        unwindowed = _windowed()(ids)
        all_full = _windowed(sliding_window=3, full_attention_layers=[0, 1])(ids)
    torch.testing.assert_close(all_full, unwindowed)
    assert (mixed - windowed).abs().max() > 1e-3 and (mixed - unwindowed).abs().max() > 1e-3
    # a token beyond both blocks' reach through windows (2 x (3 - 1) back) still reaches the last position
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 37
    with torch.no_grad():
        assert (model(changed)[:, -1] - mixed[:, -1]).abs().max() > 1e-4
        assert torch.equal(_windowed(sliding_window=3)(changed)[:, -1], windowed[:, -1])


@pytest.mark.parametrize(
    ("fields", "rule"),
    [
        (dict(full_attention_layers=[1]), "needs a window"),
        (dict(sliding_window=4, full_attention_layers=[2]), "block indices"),
        (dict(sliding_window=4, full_attention_layers=[1, 0]), "increasing"),
        (dict(sliding_window=4, full_attention_layers=[1, 1]), "increasing"),
    ],
)
def test_full_attention_layers_are_validated(fields: dict, rule: str) -> None:
    from framework.config.errors import ConfigError

    with pytest.raises(ConfigError, match="full_attention_layers") as error:
        ModelConfig(n_layers=2, **fields).validate()
    assert rule in error.value.rule


GEMMA2 = dict(mlp="geglu", gelu_approximate="tanh", norm_weight_offset=True, sandwich_norm=True,
              embedding_scale="sqrt_d_model", final_logit_softcap=2.0, attention_softcap=1.0, sliding_window=3,
              full_attention_layers=[1, 3], n_layers=4, tie_embeddings=True)  # fmt: skip


def test_gemma2_pipeline_stages_compose_to_the_full_model() -> None:
    """Blocks keep their names in a stage, so a stage holding blocks 2 and 3 still gives block 3 full attention."""
    import copy

    model = _windowed(**GEMMA2)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for i in ("2", "3"):
        del first.layers[i]
    del first.norm
    for i in ("0", "1"):
        del last.layers[i]
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(last(first(ids)), model(ids), atol=1e-5, rtol=1e-5)


def test_gemma2_backends_agree_and_backward_reaches_every_parameter() -> None:
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    documents = torch.tensor([[0] * 4 + [1] * 5, [2] * 9])
    outs = {}
    for backend in BACKENDS:
        model = _windowed(**GEMMA2, attention_backend=backend)
        with torch.no_grad():
            outs[backend] = model(ids, document_ids=documents)
    torch.testing.assert_close(outs["sdpa"], outs["naive"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["flex"], outs["naive"], atol=1e-5, rtol=1e-5)
    model = _windowed(**GEMMA2).train()
    model(ids, document_ids=documents).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
