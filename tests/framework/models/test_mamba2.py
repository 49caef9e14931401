"""Mamba-2 (framework/models/mamba2.py): chunked SSD against the token-by-token recurrence, document resets, the
span decay used by context parallelism, the document-aware causal conv against nn.Conv1d, the whole mixer
against transformers' Mamba2Mixer, and the init from (seed, name)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from framework.config.schema import Mamba2Config, ModelConfig
from framework.convert.hf.mamba2_weights import from_hf_mamba2_state, to_hf_mamba2_state
from framework.models.attention import AttentionContext
from framework.models.init import init_groups, init_weights
from framework.models.mamba2 import (
    Mamba2,
    causal_depthwise_conv,
    chunk_decay,
    chunked_ssd,
    document_starts,
    naive_ssd,
)
from framework.models.masks import AttentionMask

B, H, P, N = 2, 4, 3, 5


def _inputs(seq: int, groups: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, seq, H, P, generator=g, dtype=torch.float64),
        # softplus of a wide range: some decays near 1, some near 0
        "dt": nn.functional.softplus(torch.randn(B, seq, H, generator=g, dtype=torch.float64) * 2 - 1),
        "A": -torch.exp(torch.randn(H, generator=g, dtype=torch.float64)),
        "Bm": torch.randn(B, seq, groups, N, generator=g, dtype=torch.float64),
        "Cm": torch.randn(B, seq, groups, N, generator=g, dtype=torch.float64),
    }


def _starts(seq: int, positions: list[int]) -> torch.Tensor:
    starts = torch.zeros(B, seq, dtype=torch.bool)
    starts[0, positions] = True  # row 1 stays one document
    return starts


# resets mid-chunk (3, 9), at chunk boundaries (4, 16) and on consecutive tokens (9, 10)
STARTS = [None, [3, 4, 9, 10, 16]]


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("docs", STARTS)
@pytest.mark.parametrize("with_initial", [False, True])
def test_chunked_equals_naive(chunk: int, groups: int, docs: list[int] | None, with_initial: bool) -> None:
    seq = 19  # not a multiple of either chunk size
    inp = _inputs(seq, groups)
    starts = None if docs is None else _starts(seq, docs)
    init = torch.randn(B, H, P, N, dtype=torch.float64) if with_initial else None
    y_ref, h_ref = naive_ssd(**inp, starts=starts, initial_state=init)
    y, h = chunked_ssd(**inp, chunk_size=chunk, starts=starts, initial_state=init)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h_ref.double(), rtol=1e-5, atol=1e-6)


def test_chunked_gradients_equal_naive() -> None:
    seq, groups = 13, 2
    leaves = {k: v.clone().requires_grad_() for k, v in _inputs(seq, groups, seed=1).items()}
    init = torch.randn(B, H, P, N, dtype=torch.float64, requires_grad=True)
    starts = _starts(seq, [2, 4, 5, 11])
    probe_y, probe_h = torch.randn(B, seq, H, P, dtype=torch.float64), torch.randn(B, H, P, N)

    def grads(fn, **kw) -> list[torch.Tensor]:
        y, h = fn(**leaves, starts=starts, initial_state=init, **kw)
        loss = (y * probe_y).sum() + (h.double() * probe_h).sum()
        return torch.autograd.grad(loss, [*leaves.values(), init])

    ref = grads(naive_ssd)
    got = grads(chunked_ssd, chunk_size=4)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_fp32_finite_with_extreme_decays() -> None:
    """Decays of exp(-1e4) next to 1 and resets: the masked exponents stay finite in the forward and backward."""
    seq = 12
    inp = {k: v.float() for k, v in _inputs(seq, 1).items()}
    inp["dt"] = inp["dt"].clone()
    inp["dt"][:, 5] = 1e4
    inp["dt"][:, 6] = 0.0
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    y, h = chunked_ssd(**leaves, chunk_size=8, starts=_starts(seq, [3, 9]))
    y_ref, _ = naive_ssd(**{k: v.detach().double() for k, v in inp.items()}, starts=_starts(seq, [3, 9]))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


@pytest.mark.parametrize("docs", [None, [6], [0]])
def test_chunk_decay_carries_the_initial_state(docs: list[int] | None) -> None:
    """final(initial) = decay * initial + final(0): what a context-parallel rank needs from its predecessor."""
    seq = 11
    inp = _inputs(seq, 2, seed=2)
    starts = None if docs is None else _starts(seq, docs)
    init = torch.randn(B, H, P, N, dtype=torch.float64)
    _, from_init = chunked_ssd(**inp, chunk_size=4, starts=starts, initial_state=init)
    _, from_zero = chunked_ssd(**inp, chunk_size=4, starts=starts)
    decay = chunk_decay(inp["dt"], inp["A"], starts)
    expected = decay[..., None, None].double() * init + from_zero.double()
    torch.testing.assert_close(from_init.double(), expected, rtol=1e-6, atol=1e-7)
    if docs is not None:  # a reset inside row 0 drops the carried state; row 1 keeps it
        assert decay[0].abs().max() == 0 and decay[1].min() > 0


def test_conv_matches_conv1d_and_respects_documents() -> None:
    C, K, S = 6, 4, 10
    conv = nn.Conv1d(C, C, K, groups=C, padding=K - 1).double()
    x = torch.randn(B, S, C, dtype=torch.float64)
    weight, bias = conv.weight[:, 0].detach(), conv.bias.detach()
    ref = conv(x.transpose(1, 2))[..., :S].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, weight, bias), ref)
    torch.testing.assert_close(
        causal_depthwise_conv(x, weight, bias, torch.zeros(B, S, dtype=torch.bool)), ref
    )
    # documents [0, 4), [4, 5), [5, 10) in row 0: each equals the conv of that document alone
    starts = _starts(S, [4, 5])
    got = causal_depthwise_conv(x, weight, bias, starts)
    for lo, hi in [(0, 4), (4, 5), (5, 10)]:
        alone = conv(x[:1, lo:hi].transpose(1, 2))[..., : hi - lo].transpose(1, 2)
        torch.testing.assert_close(got[:1, lo:hi], alone)
    torch.testing.assert_close(got[1:], ref[1:])


def _cfg(groups: int = 2, chunk: int = 8, conv_bias: bool = True) -> ModelConfig:
    mamba = Mamba2Config(heads=6, head_dim=8, state_dim=16, groups=groups, conv_kernel=4, conv_bias=conv_bias,
                         chunk_size=chunk)  # fmt: skip
    return ModelConfig(d_model=48, norm_eps=1e-5, mamba2=mamba)


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (D, norm gain, biases not 1 / 0), so every parameter's role is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))


def test_packed_documents_equal_separate_documents() -> None:
    cfg = _cfg(chunk=4)
    layer = Mamba2(cfg)
    _randomise(layer)
    a, b = torch.randn(1, 7, cfg.d_model), torch.randn(1, 10, cfg.d_model)
    docs = torch.tensor([[0] * 7 + [1] * 10])
    packed = layer(
        torch.cat([a, b], dim=1), AttentionContext(mask=AttentionMask(q_documents=docs, k_documents=docs))
    )
    torch.testing.assert_close(packed[:, :7], layer(a, AttentionContext()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], layer(b, AttentionContext()), rtol=1e-5, atol=1e-5)


def test_document_starts() -> None:
    starts = document_starts(torch.tensor([[0, 0, 1, 1, 2], [3, 3, 3, 3, 3]]))
    assert starts.tolist() == [[False, False, True, False, True], [False] * 5]


@pytest.mark.parametrize("groups", [1, 2])
def test_matches_transformers_mamba2_mixer(groups: int) -> None:
    from transformers import Mamba2Config as HFMamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = _cfg(groups=groups, chunk=8)
    hf_cfg = HFMamba2Config(hidden_size=48, num_heads=6, head_dim=8, state_size=16, n_groups=groups,
                            conv_kernel=4, chunk_size=8, expand=1, use_conv_bias=True, layer_norm_epsilon=1e-5,
                            num_hidden_layers=1)  # fmt: skip
    torch.manual_seed(0)
    hf = Mamba2Mixer(hf_cfg, layer_idx=0).eval()
    _randomise(hf, seed=1)
    ours = Mamba2(cfg)
    ours.load_state_dict(from_hf_mamba2_state(hf.state_dict(), cfg))
    x = torch.randn(2, 19, 48)  # 19: not a multiple of the chunk
    with torch.no_grad():
        expected = hf(x)
        got = ours(x, AttentionContext())
    assert (got - expected).abs().max() <= 1e-5
    back = to_hf_mamba2_state(ours.state_dict(), cfg)
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_backward_reaches_every_parameter() -> None:
    layer = Mamba2(_cfg(chunk=4))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0] * 9])
    ctx = AttentionContext(mask=AttentionMask(q_documents=docs, k_documents=docs))
    layer(torch.randn(2, 9, 48), ctx).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_init_from_seed_and_name() -> None:
    cfg = _cfg()
    model = nn.ModuleDict({"mixer": Mamba2(cfg)})
    init_weights(model, cfg, seed=3)
    m = model["mixer"]
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16 and A.std() > 0
    dt = nn.functional.softplus(m.dt_bias)
    assert dt.min() >= cfg.mamba2.dt_min * (1 - 1e-5) and dt.max() <= cfg.mamba2.dt_max * (1 + 1e-5)
    assert torch.equal(m.D, torch.ones(6)) and torch.equal(m.norm_weight, torch.ones(48))
    assert m.x_conv.abs().max() <= 1 / math.sqrt(4) and m.x_conv.std() > 0
    assert torch.equal(m.B_conv_bias, torch.zeros(32))
    groups = init_groups(model, cfg)
    assert "mixer.out_proj.weight" in groups["output_projections"][0]
    assert "mixer.in_x.weight" in groups["matrices"][0]
    again = nn.ModuleDict({"mixer": Mamba2(cfg)})
    init_weights(again, cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_kernel_seam_imports_without_mamba_ssm() -> None:
    from framework.kernels import mamba_ssm

    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba_ssm is installed here")
    assert not mamba_ssm.available()
    with pytest.raises(ImportError, match="mamba_ssm is not importable"):
        mamba_ssm.install_mamba_ssm(Mamba2(_cfg()))


def test_kernel_is_used_on_cuda_only() -> None:
    class Refuse:
        def chunk_scan(self, *args, **kwargs):
            raise AssertionError("the kernel ran on CPU tensors")

    layer = Mamba2(_cfg())
    x = torch.randn(1, 5, 48)
    expected = layer(x, AttentionContext())
    layer.kernel = Refuse()
    torch.testing.assert_close(layer(x, AttentionContext()), expected)


def test_meta_build_then_init_equals_direct_build() -> None:
    cfg = _cfg()
    direct = nn.ModuleDict({"mixer": Mamba2(cfg)})
    init_weights(direct, cfg, seed=5)
    with torch.device("meta"):
        meta = nn.ModuleDict({"mixer": Mamba2(cfg)})
    meta.to_empty(device="cpu")
    init_weights(meta, cfg, seed=5)
    for (name, a), b in zip(direct.named_parameters(), meta.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_layer_stays_close_to_fp32() -> None:
    """bf16 weights and activations: the scan runs in fp32 inside and returns bf16, near the fp32 layer."""
    cfg = _cfg(chunk=4)
    layer = Mamba2(cfg)
    init_weights(nn.ModuleDict({"mixer": layer}), cfg, seed=0)
    x = torch.randn(2, 11, 48)
    expected = layer(x, AttentionContext())
    got = layer.to(torch.bfloat16)(x.bfloat16(), AttentionContext())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()
    inp = {k: v.bfloat16() for k, v in _inputs(9, 2).items()}
    y, h = chunked_ssd(**inp, chunk_size=4)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
