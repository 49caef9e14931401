"""Which kernel and which mask each attention call gets (the CUDA rules checked on CPU by patching), and that
masks are built only where a kernel reads them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config.schema import ModelConfig
from framework.models import attention as attention_module
from framework.models import build_model
from framework.models.attention import Attention, AttentionContext, attention_path
from framework.models.masks import AttentionMask

B, S, HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 2, 64, 4, 2, 8, 24
DOCS = torch.arange(S).expand(B, S) // 9


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's reference math on CPU without a dynamo trace per score_mod (forward only)."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def make_attention(backend: str = "sdpa", **overrides: object) -> Attention:
    fields = dict(
        d_model=D_MODEL, n_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, attention_backend=backend
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return Attention(ModelConfig(**fields))


class BigAllocations(TorchDispatchMode):
    """Records the dtype of every op output with at least `elements` elements."""

    def __init__(self, elements: int) -> None:
        super().__init__()
        self.elements, self.dtypes = elements, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch protocol)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.elements:
                self.dtypes.append((func.__name__, t.dtype))
        return out


# ------------------------------------------------------------------------------------ masks only when used


def test_plain_causal_sdpa_builds_no_dense_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = AttentionMask.dense

    def counting(self: AttentionMask, *args: object) -> torch.Tensor:
        built.append(1)
        return original(self, *args)

    monkeypatch.setattr(AttentionMask, "dense", counting)
    x = torch.randn(B, S, D_MODEL)
    make_attention()(x, AttentionContext(AttentionMask(causal=True)))
    assert built == []  # is_causal=True: the kernel needs no mask
    make_attention()(x, AttentionContext(AttentionMask(causal=True, window=4)))
    assert built == [1]  # the counter sees a mask that is used


@pytest.mark.parametrize(
    "mask",
    [
        AttentionMask(causal=True),
        AttentionMask(causal=True, window=5),
        AttentionMask(causal=True, prefix_lengths=torch.tensor([3, 7])),
        AttentionMask(causal=True, q_documents=DOCS, k_documents=None),
    ],
    ids=["causal", "window", "prefix", "documents"],
)
def test_dense_mask_allocates_no_int64_square(mask: AttentionMask) -> None:
    if mask.q_documents is not None:
        mask.k_documents = mask.q_documents
    with BigAllocations(S * S) as seen:
        dense = mask.dense(B, S, S, torch.device("cpu"))
    assert dense.shape == (B, 1, S, S) and dense.dtype == torch.bool
    assert seen.dtypes and all(dtype == torch.bool for _, dtype in seen.dtypes), seen.dtypes


# ---------------------------------------------------------------------------------------- kernel routing


# A model of torch 2.11's CUDA SDPA kernel choice, written from the kernels' constraints: flash takes fp16 /
# bf16, GQA and dropout, but no mask and no bias; memory-efficient takes masks, biases, fp32 and dropout, but no
# GQA. A call neither takes runs the math kernel (fp32 scores [B, H, Sq, Sk] materialised).
def cuda_sdpa_kernel(*, fused_sdpa: bool, half: bool, gqa_call: bool) -> str:
    if fused_sdpa and half:
        return "flash"
    if not gqa_call:
        return "efficient"
    return "math"


CASES = [
    dict(fused_sdpa=f, dropout=d, gqa=g, half=h)
    for f in (True, False)
    for d in (True, False)
    for g in (True, False)
    for h in (True, False)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_cuda_sdpa_backend_never_reaches_the_math_kernel(case: dict) -> None:
    path = attention_path("sdpa", "cuda", **case)
    if path == "flex_compiled":
        assert not case["dropout"], "FlexAttention has no attention dropout"
        assert not case["fused_sdpa"], "a call the flash kernel takes stays on SDPA"
        return
    assert path in ("sdpa", "sdpa_repeat_kv")
    gqa_call = case["gqa"] and path == "sdpa"  # repeat_kv hands the kernel as many KV heads as query heads
    kernel = cuda_sdpa_kernel(fused_sdpa=case["fused_sdpa"], half=case["half"], gqa_call=gqa_call)
    assert kernel != "math", (case, path)
    if not case["fused_sdpa"]:
        assert case["dropout"], "a mask or bias without dropout goes to block-sparse FlexAttention"
    if path == "sdpa_repeat_kv":
        assert case["gqa"] and kernel == "efficient"  # repeat only where it is needed


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_cpu_paths_are_unchanged_and_flex_compiles_off_cpu(case: dict) -> None:
    assert attention_path("sdpa", "cpu", **case) == "sdpa"  # CPU SDPA takes masks and GQA as given
    assert attention_path("naive", "cuda", **case) == "naive"
    assert attention_path("flex", "cpu", **case) == "flex"  # no CPU backward; ~40 s compile per shape
    assert attention_path("flex", "cuda", **case) == "flex_compiled"


def test_compiled_flex_is_made_once_and_wraps_flex_attention() -> None:
    compiled = attention_module.compiled_flex_attention()
    assert compiled is attention_module.compiled_flex_attention()
    assert compiled._torchdynamo_orig_callable is flex_attention  # a torch.compile wrapper of it


class Calls:
    """Spies on SDPA and both FlexAttention callables while CPU tensors are routed as CUDA ones. The eager
    flex_attention refuses to run: on CUDA only the compiled one may (the spy runs the eager math on CPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
        self.sdpa: list[dict] = []
        self.flex: list[dict] = []
        sdpa, flex = F.scaled_dot_product_attention, flex_attention

        def spy_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
            self.sdpa.append(dict(kw, kv_heads=k.shape[1]))
            return sdpa(q, k, v, **kw)

        def spy_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
            self.flex.append(dict(kw, kv_heads=k.shape[1]))
            return flex(q, k, v, **kw)

        def eager_flex(*args: object, **kwargs: object) -> torch.Tensor:
            raise AssertionError("eager FlexAttention called on the CUDA path")

        monkeypatch.setattr(attention_module, "device_type", lambda t: device)
        monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy_sdpa)
        monkeypatch.setattr(attention_module, "compiled_flex_attention", lambda: spy_flex)
        if device == "cuda":
            monkeypatch.setattr(attention_module, "flex_attention", eager_flex)


MASK_CASES = {
    "window": (AttentionMask(causal=True, window=5), {}),
    "documents": (AttentionMask(causal=True, q_documents=DOCS, k_documents=DOCS), {}),
    "prefix": (AttentionMask(causal=True, prefix_lengths=torch.tensor([3, 40])), {}),
    "alibi_causal": (AttentionMask(causal=True), dict(position="alibi")),
    "soft_bidirectional": (AttentionMask(), dict(soft_distance_bias=True)),
}


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_masked_attention_on_cuda_runs_compiled_flex(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    mask, overrides = MASK_CASES[name]
    attn, x = make_attention(**overrides), torch.randn(B, S, D_MODEL)
    ctx = lambda: AttentionContext(mask, positions=torch.arange(S).expand(B, S))  # noqa: E731
    with torch.no_grad():
        expected = attn(x, ctx())  # CPU: SDPA with the dense mask / bias
        calls = Calls(monkeypatch, "cuda")
        got = attn(x, ctx())
    assert calls.sdpa == [] and len(calls.flex) == 1
    assert calls.flex[0]["enable_gqa"] is True and calls.flex[0]["kv_heads"] == KV_HEADS  # no repeated KV
    assert (calls.flex[0]["block_mask"] is None) == mask.is_full
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_masked_attention_with_dropout_on_cuda_repeats_kv_for_the_efficient_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attn, x = make_attention(attention_dropout=0.1), torch.randn(B, S, D_MODEL)
    calls = Calls(monkeypatch, "cuda")
    attn.train()(x, AttentionContext(AttentionMask(causal=True, window=5)))
    assert calls.flex == [] and len(calls.sdpa) == 1
    call = calls.sdpa[0]
    assert call["kv_heads"] == HEADS and call["enable_gqa"] is False and call["attn_mask"].dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_causal_on_cuda_keeps_sdpa_and_gqa_only_where_flash_takes_it(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    attn, x = make_attention().to(dtype), torch.randn(B, S, D_MODEL, dtype=dtype)
    with torch.no_grad():
        expected = attn(x, AttentionContext(AttentionMask(causal=True)))
        calls = Calls(monkeypatch, "cuda")
        got = attn(x, AttentionContext(AttentionMask(causal=True)))
    assert calls.flex == [] and len(calls.sdpa) == 1
    call = calls.sdpa[0]
    assert call["is_causal"] is True and call["attn_mask"] is None
    half = dtype == torch.bfloat16  # flash: GQA as is; fp32 runs the efficient kernel: KV heads repeated
    assert (call["kv_heads"], call["enable_gqa"]) == ((KV_HEADS, True) if half else (HEADS, False))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_masked_attention_on_cpu_stays_on_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch, "cpu")
    make_attention()(torch.randn(B, S, D_MODEL), AttentionContext(AttentionMask(causal=True, window=5)))
    assert calls.flex == [] and len(calls.sdpa) == 1
    assert calls.sdpa[0]["enable_gqa"] is True and calls.sdpa[0]["attn_mask"].dtype == torch.bool


def test_flex_backend_on_cuda_runs_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch, "cuda")
    with torch.no_grad():
        make_attention("flex")(torch.randn(B, S, D_MODEL), AttentionContext(AttentionMask(causal=True)))
    assert len(calls.flex) == 1 and calls.sdpa == []


def test_block_mask_is_built_once_per_forward_not_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(
        vocab_size=37, d_model=D_MODEL, n_layers=3, n_heads=HEADS, kv_heads=KV_HEADS, ffn_hidden=32,
        max_seq_len=S, sliding_window=5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    built: list[int] = []
    create = attention_module.create_block_mask

    def counting(*args: object, **kwargs: object) -> object:
        built.append(1)
        return create(*args, **kwargs)

    monkeypatch.setattr(attention_module, "create_block_mask", counting)
    calls = Calls(monkeypatch, "cuda")
    with torch.no_grad():
        model(torch.randint(0, 37, (B, S)))
        model(torch.randint(0, 37, (B, S)))
    assert len(calls.flex) == 2 * cfg.n_layers and calls.sdpa == []
    assert built == [1, 1]  # one block mask per forward (per batch), shared by the layers
