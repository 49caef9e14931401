"""Which kernel and which mask each attention call gets (the CUDA rules checked on CPU by patching), and that
masks are built only where a kernel reads them."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config.schema import ModelConfig
from framework.models.attention import Attention, AttentionContext
from framework.models.masks import AttentionMask

B, S, HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 2, 64, 4, 2, 8, 24


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
        AttentionMask(causal=True, q_documents=torch.arange(S).expand(B, S) // 9, k_documents=None),
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
