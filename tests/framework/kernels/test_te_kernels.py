"""The kernels choice and the TE attention mapping, on CPU (TE itself cannot run here: see test_te_gpu.py).

The mask mapping is checked against TE's documented semantics written out here (DotProductAttention docs:
"query at position i attends to keys in [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q +
window_size[1]] inclusive", -1 = unbounded, causal = (-1, 0), "padding" = each cu_seqlens run is its own
sequence) rather than against te.py's own code.
"""

from __future__ import annotations

import types

import pytest
import torch

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, Recipe
from framework.kernels import te as te_module
from framework.kernels.choice import resolve_kernels, use_kernels
from framework.kernels.te import (
    TEAttention,
    cu_seqlens,
    import_te,
    install_te_attention,
    mask_kind,
    te_importable,
)
from framework.models import build_model
from framework.models.attention import Attention, AttentionContext, KernelCall, sdpa_attention
from framework.models.masks import AttentionMask

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 4, 4, 4]])


def recipe(**model: object) -> Recipe:
    r = Recipe()
    for key, value in model.items():
        setattr(r.model, key, value)
    return r


# ------------------------------------------------------------------------------------------------ the choice


def test_auto_picks_te_only_on_cuda_with_te_importable() -> None:
    assert resolve_kernels(recipe(), CPU, importable=lambda: True) == "torch"
    assert resolve_kernels(recipe(), CUDA, importable=lambda: False) == "torch"
    assert resolve_kernels(recipe(), CUDA, importable=lambda: True) == "te"
    # ... and only for recipes TE expresses: ALiBi falls back to torch instead of failing
    assert resolve_kernels(recipe(position="alibi"), CUDA, importable=lambda: True) == "torch"
    assert resolve_kernels(recipe(kernels="torch"), CUDA, importable=lambda: True) == "torch"


def test_asking_for_te_without_it_is_one_config_error_naming_the_gpu_extra() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_kernels(recipe(kernels="te"), CUDA, importable=lambda: False)
    assert err.value.key == "model.kernels" and "loom-pretrain[gpu]" in err.value.fix
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="CUDA only"):
        resolve_kernels(recipe(kernels="te"), CPU, importable=lambda: True)
    assert resolve_kernels(recipe(kernels="te"), CUDA, importable=lambda: True) == "te"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"position": "relative_bias"}, "model.position"),
        ({"soft_distance_bias": True}, "model.soft_distance_bias"),
        ({"attention_softcap": 50.0}, "model.attention_softcap"),
        ({"attention_sinks": True}, "model.attention_sinks"),
    ],
)
def test_te_refuses_score_biases(change: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_kernels(recipe(kernels="te", **change), CUDA, importable=lambda: True)
    assert err.value.key == key


def test_te_refuses_prefix_lm() -> None:
    r = recipe(kernels="te")
    r.data.objective = "prefix"
    with pytest.raises(ConfigError) as err:
        resolve_kernels(r, CUDA, importable=lambda: True)
    assert err.value.key == "data.objective"


@pytest.mark.parametrize(
    ("parallel", "data", "key"),
    [
        ({"cp": 4, "cp_ring": 2}, {}, "parallel.cp_ulysses"),  # hierarchical a2a+p2p: not mapped
        ({"cp": 2, "cp_ring": 2}, {"document_masking": True}, "data.document_masking"),
        ({"cp": 2, "cp_ring": 2, "cp_load_balance": False}, {}, "parallel.cp_load_balance"),
    ],
)
def test_te_ring_maps_only_what_te_shards_like_loom(
    parallel: dict[str, object], data: dict[str, object], key: str
) -> None:
    """TE's p2p CP runs on Loom's zigzag shards of the packed sequence: a plain causal ring maps; a hybrid,
    packed documents or contiguous shards are refused for te, and auto then runs the torch ring."""
    ring = recipe(kernels="te")
    ring.parallel.cp, ring.parallel.cp_ring = 2, 2
    assert resolve_kernels(ring, CUDA, importable=lambda: True) == "te"
    r = recipe(kernels="te")
    for name, value in parallel.items():
        setattr(r.parallel, name, value)
    for name, value in data.items():
        setattr(r.data, name, value)
    with pytest.raises(ConfigError) as err:
        resolve_kernels(r, CUDA, importable=lambda: True)
    assert err.value.key == key
    r.model.kernels = "auto"
    assert resolve_kernels(r, CUDA, importable=lambda: True) == "torch"


def test_train_refuses_te_on_cpu_before_building_anything() -> None:
    from framework.run import train

    r = recipe(kernels="te")
    r.train.device = "cpu"
    r.data.tokenizer = "/nonexistent/tokenizer.model"  # never reached: the error comes first
    with pytest.raises(ConfigError, match="model.kernels"):
        train(r)


@pytest.mark.skipif(te_importable(), reason="Transformer Engine is installed here")
def test_importing_te_here_names_the_gpu_extra() -> None:
    with pytest.raises(ImportError, match=r"loom-pretrain\[gpu\]"):
        import_te()


# ------------------------------------------------------------------------------------------------ mask mapping


def te_allowed(mask_type: str, window: tuple[int, int] | None, cu: torch.Tensor) -> torch.Tensor:
    """[T, T] per TE's docs: tokens attend within their cu_seqlens run; window (left, right) around the query's
    local index (-1 unbounded); a causal mask type alone means window (-1, 0)."""
    total = int(cu[-1])
    seq = torch.bucketize(torch.arange(total), cu[1:].long(), right=True)
    local = torch.arange(total) - cu[seq].long()
    left, right = window if window is not None else (-1, 0 if "causal" in mask_type else -1)
    if "causal" in mask_type:
        right = 0 if right < 0 else min(right, 0)
    i, j = local.view(-1, 1), local.view(1, -1)
    ok = seq.view(-1, 1) == seq.view(1, -1)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def loom_allowed(mask: AttentionMask, batch: int, seq: int) -> torch.Tensor:
    """Loom's dense mask laid out block-diagonally over the flattened batch (rows never see each other)."""
    dense = mask.dense(batch, seq, seq, CPU)[:, 0]
    return torch.block_diag(*dense)


@pytest.mark.parametrize(
    "mask",
    [
        AttentionMask(),
        AttentionMask(causal=True),
        AttentionMask(causal=True, window=3),
        AttentionMask(causal=True, q_documents=DOCS, k_documents=DOCS),
        AttentionMask(causal=True, window=2, q_documents=DOCS, k_documents=DOCS),
        AttentionMask(q_documents=DOCS, k_documents=DOCS),  # encoder with packed documents
    ],
    ids=["full", "causal", "window", "documents", "window+documents", "bidirectional documents"],
)
def test_te_mask_mapping_means_the_same_as_loom_mask(mask: AttentionMask) -> None:
    batch, seq = DOCS.shape
    mask_type, window = mask_kind(mask)
    if mask.q_documents is None:
        cu = torch.arange(0, batch * seq + 1, seq)  # bshd: each row is one sequence
    else:
        cu, _ = cu_seqlens(mask.q_documents)
    assert torch.equal(te_allowed(mask_type, window, cu), loom_allowed(mask, batch, seq))


def test_cu_seqlens_starts_a_run_at_each_row_and_each_new_id() -> None:
    cu, longest = cu_seqlens(torch.tensor([[7, 7, 8, 8, 8], [8, 8, 8, 9, 9]]))
    assert cu.tolist() == [0, 2, 5, 8, 10] and cu.dtype == torch.int32 and longest == 3


# ------------------------------------------------------------------------------------------------ the seam


def small_config(**change: object) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=48, max_seq_len=16
    )
    for key, value in change.items():
        setattr(cfg, key, value)
    return cfg


def sdpa_kernel(q, k, v, ctx: AttentionContext, call: KernelCall) -> torch.Tensor:  # noqa: ANN001
    """A stand-in kernel: what the seam hands over must be enough to reproduce the torch backend."""
    if call.inv_temperature is not None:
        q = q * call.inv_temperature.view(1, -1, 1, 1)
    mask = ctx.dense_mask(q.shape[0], q.shape[2], k.shape[2], q.device)
    return sdpa_attention(q, k, v, scale=call.scale, mask=mask)


def test_an_injected_kernel_gets_everything_the_torch_backend_uses() -> None:
    torch.manual_seed(0)
    layer = Attention(small_config(learned_temperature=True, attention_temperature=2.0, softmax_scale=0.3))
    x = torch.randn(2, 8, 32)
    ctx = AttentionContext(AttentionMask(causal=True, window=3, q_documents=DOCS, k_documents=DOCS))
    expected = layer(x, ctx)
    layer.kernel = sdpa_kernel
    torch.testing.assert_close(layer(x, AttentionContext(ctx.mask)), expected)


def test_an_injected_kernel_refuses_score_biases() -> None:
    layer = Attention(small_config(position="alibi"))
    layer.kernel = sdpa_kernel
    positions = torch.arange(8).expand(2, 8)
    with pytest.raises(NotImplementedError, match="score bias"):
        layer(torch.randn(2, 8, 32), AttentionContext(AttentionMask(causal=True), positions=positions))


def test_installing_te_attention_keeps_the_state_dict() -> None:
    model = build_model(small_config())
    keys = list(model.state_dict())
    assert install_te_attention(model) == 2  # one self-attention per block; TE itself is built on first call
    assert list(model.state_dict()) == keys
    assert all(isinstance(m.kernel, TEAttention) for m in model.modules() if isinstance(m, Attention))
    assert use_kernels(build_model(small_config()), "torch") is not None


class FakeDotProductAttention:
    """Stands in for te.DotProductAttention: refuses mixed dtypes as TE does, and attends per bshd row."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.dtypes: list[tuple[torch.dtype, ...]] = []

    def __call__(self, q, k, v, **kwargs: object) -> torch.Tensor:  # noqa: ANN001
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        assert kwargs["qkv_format"] == "bshd" and kwargs["window_size"] is None
        if not q.dtype == k.dtype == v.dtype:
            raise AssertionError(f"TE: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        groups = q.shape[2] // k.shape[2]
        out = sdpa_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).repeat_interleave(groups, 1),
            v.transpose(1, 2).repeat_interleave(groups, 1),
            scale=self.kwargs["softmax_scale"],
            is_causal=kwargs["attn_mask_type"] == "causal",
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def test_te_seam_hands_te_q_k_in_vs_dtype_when_qk_norm_makes_them_fp32(monkeypatch) -> None:
    fake = types.SimpleNamespace(DotProductAttention=FakeDotProductAttention)
    monkeypatch.setattr(te_module, "import_te", lambda: fake)
    torch.manual_seed(0)
    layer = Attention(small_config(qk_norm=True))
    x = torch.randn(2, 8, 32)
    positions = torch.arange(8).expand(2, 8)
    # bf16 autocast over fp32 weights, as a bf16 run: the projections give bf16 q, k, v, then the qk RMSNorm's
    # fp32 weight promotes q and k to fp32 (torch's SDPA autocasts them back; TE does not)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x, AttentionContext(AttentionMask(causal=True), positions=positions))
        kernel = TEAttention()
        layer.kernel = kernel
        out = layer(x, AttentionContext(AttentionMask(causal=True), positions=positions))
    (dpa,) = kernel._modules.values()
    assert dpa.dtypes == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
