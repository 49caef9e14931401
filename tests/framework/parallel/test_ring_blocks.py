"""Ring attention's block kernels and merge (framework/parallel/ring.py) in one process: a ring of one rank
computes its one block with every score term, and must equal the naive formula (framework/models/attention.py
naive_attention) in value and in every gradient; the chunked math form must equal CPU's fused flash op."""

from __future__ import annotations

import pytest
import torch

from framework.models.attention import naive_attention
from framework.models.masks import AttentionMask
from framework.parallel.ring import RingAttention, RingPlan, token_order

B, H, KV, S, D = 2, 4, 2, 24, 8


def _inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, KV, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    documents = torch.cumsum(torch.rand(B, S, generator=g) < 0.2, dim=1)
    return q, k, v, documents


def _plan(documents: torch.Tensor, *, chunk_elements: int = 2**28, cap: float | None = None) -> RingPlan:
    mask = AttentionMask(causal=True, window=9, q_documents=documents, k_documents=documents)
    positions = torch.arange(S, device=documents.device).expand(B, S)
    # one ring rank: its own block is the whole sequence
    tokens = [token_order(S, 1, 1).to(documents.device)]
    return RingPlan(None, 0, mask, tokens, D**-0.5, cap, positions, chunk_elements=chunk_elements)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("chunk_elements", [2**28, B * H * S * 5])  # one chunk; chunks of 5 query rows
def test_one_rank_ring_with_every_score_term_matches_naive(chunk_elements: int, device: str) -> None:
    """On CUDA this is the math block form every GPU ring runs (row chunks, fp32 scores)."""
    q, k, v, documents = (t.to(device) for t in _inputs())
    g = torch.Generator().manual_seed(1)
    coef, inv_t, sinks = (torch.rand(H, generator=g, dtype=torch.float64).to(device) + 0.5 for _ in range(3))
    table = torch.randn(1, H, S, S, generator=g, dtype=torch.float64).to(device)
    plan = _plan(documents, chunk_elements=chunk_elements, cap=2.0)
    ring_in = [_leaf(t) for t in (q, k, v, coef, table, inv_t, sinks)]
    out = RingAttention.apply(*ring_in[:3], plan, *ring_in[3:])
    ref_in = [_leaf(t) for t in (q, k, v, coef, table, inv_t, sinks)]
    distance = (plan.positions[:, :, None] - plan.positions[:, None, :]).abs().unsqueeze(1)
    bias = ref_in[4] - ref_in[3].view(1, -1, 1, 1) * distance
    mask = plan.mask.dense(B, S, S, q.device)
    ref = naive_attention(
        *ref_in[:3],
        scale=plan.scale,
        mask=mask,
        bias=bias,
        inv_temperature=ref_in[5],
        cap=2.0,
        sinks=ref_in[6],
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)  # the ring computes in fp32
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    out.backward(grad)
    ref.backward(grad)
    for name, a, b in zip(("q", "k", "v", "coef", "table", "inv_t", "sinks"), ring_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_math_form_in_row_chunks_equals_the_fused_cpu_kernel() -> None:
    """Plain masked softmax: the fused flash op; a temperature of exactly 1 forces the math form, whose query
    rows are taken 3 at a time here."""
    q, k, v, documents = (t.float() if t.is_floating_point() else t for t in _inputs(2))
    one = torch.ones(H)
    results = []
    for terms, chunk in (((None, None, None, None), 2**28), ((None, None, one, None), B * H * S * 3)):
        leaves = [_leaf(t) for t in (q, k, v)]
        out = RingAttention.apply(*leaves, _plan(documents, chunk_elements=chunk), *terms)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), *(t.grad for t in leaves)])
    for fused, math in zip(*results, strict=True):
        torch.testing.assert_close(fused, math, rtol=1e-5, atol=1e-6)


def test_plain_causal_blocks_run_as_mask_free_pieces() -> None:
    """Plain causal: a block splits into pieces by runs of consecutive tokens (seen whole, causal, or skipped) that
    the fused kernel computes without a dense mask. One rank holding the tokens in an order of three runs (chunks
    0, 3 and 1 + 2 of 4), against the naive causal formula in natural order, values and gradients."""
    from framework.parallel.ring import _pieces

    q, k, v, _ = (t.float() if t.is_floating_point() else t for t in _inputs(3))
    chunks = torch.arange(S).chunk(4)
    order = torch.cat([chunks[0], chunks[3], chunks[1], chunks[2]])
    plan = RingPlan(None, 0, AttentionMask(causal=True), [order], D**-0.5)
    pieces = _pieces(plan, 0)
    assert pieces is not None and sum(causal for _, _, causal, _ in pieces) == 3 and len(pieces) == 6, pieces
    ring_in = [_leaf(t.index_select(2, order)) for t in (q, k, v)]
    out = RingAttention.apply(*ring_in, plan, None, None, None, None)
    ref_in = [_leaf(t) for t in (q, k, v)]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    ref = naive_attention(*ref_in, scale=plan.scale, mask=mask)
    torch.testing.assert_close(out, ref.index_select(2, order), rtol=1e-5, atol=1e-6)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    out.backward(grad.index_select(2, order))
    ref.backward(grad)
    for a, b in zip(ring_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad.index_select(2, order), rtol=1e-5, atol=1e-5)
