"""Transformer Engine attention and FP8 on a CUDA GPU with TE installed, against torch SDPA in fp32.

Skipped elsewhere (every CPU machine, and GPU machines without the `gpu` extra), with the reason.
"""

from __future__ import annotations

import pytest
import torch

from framework.kernels.te import TEAttention, fp8_context, fp8_supported, install_te_attention, swap_linears
from framework.models.attention import AttentionContext, KernelCall, sdpa_attention
from framework.models.masks import AttentionMask


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from framework.kernels.te import te_importable  # imports TE: only tried on CUDA machines

    return None if te_importable() else "needs Transformer Engine: pip install 'loom-pretrain[gpu]'"


_REASON = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

B, S, HEADS, KV_HEADS, D = 2, 256, 8, 2, 64


def documents() -> torch.Tensor:
    """Two rows of packed documents with uneven lengths (ids are contiguous runs, as Loom packs them)."""
    lengths = [[100, 60, 96], [7, 200, 49]]
    rows = [
        torch.repeat_interleave(torch.arange(len(r)) + 10 * i, torch.tensor(r)) for i, r in enumerate(lengths)
    ]
    return torch.stack(rows).cuda()


MASKS = {
    "full": lambda: AttentionMask(),
    "causal": lambda: AttentionMask(causal=True),
    "window": lambda: AttentionMask(causal=True, window=64),
    "documents": lambda: AttentionMask(causal=True, q_documents=(d := documents()), k_documents=d),
    "window+documents": lambda: AttentionMask(
        causal=True, window=32, q_documents=(d := documents()), k_documents=d
    ),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_te_attention_matches_sdpa(name: str) -> None:
    torch.manual_seed(0)
    q = torch.randn(B, HEADS, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(B, KV_HEADS, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    ctx = AttentionContext(MASKS[name]())
    out = TEAttention()(q, k, v, ctx, KernelCall(scale=D**-0.5, dropout_p=0.0, inv_temperature=None))
    mask = ctx.dense_mask(B, S, S, q.device)
    reference = sdpa_attention(q.float(), k.float(), v.float(), scale=D**-0.5, mask=mask)
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_a_model_with_te_attention_matches_torch() -> None:
    from framework.config.schema import ModelConfig
    from framework.models import build_model, init_weights

    cfg = ModelConfig(
        vocab_size=256, d_model=256, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=512, sliding_window=64
    )
    model = build_model(cfg).cuda().to(torch.bfloat16)
    init_weights(model, cfg, seed=0)
    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    expected = model(tokens).float()
    install_te_attention(model)
    torch.testing.assert_close(model(tokens).float(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("recipe", ["delayed", "current", "mxfp8"])
def test_fp8_context_runs_te_linear_close_to_bf16(recipe: str) -> None:
    ok, why = fp8_supported(recipe)
    if not ok:
        pytest.skip(f"{recipe} FP8 not supported on this GPU: {why}")
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    block = block.cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    expected = block(x).float()
    assert swap_linears(block) == 2
    with fp8_context(recipe):
        out = block(x).float()
    relative = (out - expected).norm() / expected.norm()
    assert relative < 0.1, f"{recipe}: fp8 vs bf16 relative error {relative:.3f}"
