"""Gated DeltaNet: chunked WY form vs the token-by-token recurrence (outputs, states, gradients, documents), the
state-transition map, the causal depthwise conv vs nn.Conv1d, and the module vs transformers' Qwen3-Next layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.config.schema import GDNConfig, ModelConfig
from framework.convert.hf.gdn_weights import from_hf_gdn_state, to_hf_gdn_state
from framework.kernels import fla
from framework.models.attention import AttentionContext
from framework.models.gdn import (
    GatedDeltaNet,
    causal_depthwise_conv,
    chunk_state_transition,
    chunked_gated_delta_rule,
    document_starts,
    naive_gated_delta_rule,
)
from framework.models.init import init_groups, init_weights
from framework.models.masks import AttentionMask

B, S, H, DK, DV = 2, 23, 3, 5, 4


def inputs(dtype=torch.float64, seq=S, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k, v = rand(B, seq, H, DK), rand(B, seq, H, DK), rand(B, seq, H, DV)
    g = -torch.rand(B, seq, H, generator=gen, dtype=dtype) * 0.5  # log decay <= 0
    beta = torch.rand(B, seq, H, generator=gen, dtype=dtype)
    return q, k, v, g, beta


def starts_at(*rows: list[int], seq: int = S) -> torch.Tensor:
    """[B, seq] bool with position 0 and the given positions of each row marked."""
    out = torch.zeros(len(rows), seq, dtype=torch.bool)
    out[:, 0] = True
    for b, row in enumerate(rows):
        out[b, row] = True
    return out


# resets mid-chunk, two in a row, at chunk boundaries (4, 8, 16), and right at the last token
DOCUMENTS = [None, starts_at([5, 8, 9, 16], [4, 17, 22])]


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("starts", DOCUMENTS, ids=["no-docs", "docs"])
@pytest.mark.parametrize("with_initial", [False, True])
def test_chunked_equals_recurrence(chunk: int, starts, with_initial: bool) -> None:
    q, k, v, g, beta = inputs()
    init = torch.randn(B, H, DK, DV, dtype=torch.float64) if with_initial else None
    if with_initial and starts is not None:
        starts = starts.clone()
        starts[1, 0] = False  # row 1 continues the carried-in state, row 0 discards it
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, starts, init)
    o, state = chunked_gated_delta_rule(q, k, v, g, beta, starts, init, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, s_ref, atol=1e-12, rtol=0)


def test_chunked_equals_recurrence_fp32_and_dtype() -> None:
    q, k, v, g, beta = inputs(torch.float32, seq=37)
    starts = starts_at([3, 16], [31], seq=37)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, starts)
    o, state = chunked_gated_delta_rule(q, k, v, g, beta, starts, chunk_size=16)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=0)
    o16, _ = chunked_gated_delta_rule(*(x.bfloat16() for x in (q, k, v)), g, beta, starts, chunk_size=16)
    assert o16.dtype == torch.bfloat16


def test_strong_decay_stays_finite() -> None:
    # cumulative log decay ~ -2000 inside a chunk: exp(G_j - G_t) for t < j would overflow if not masked first
    q, k, v, g, beta = inputs(seq=16)
    g = g * 0 - 120.0
    starts = starts_at([7], [3], seq=16)
    o, state = chunked_gated_delta_rule(
        q.requires_grad_(), k, v, g.requires_grad_(), beta, starts, chunk_size=16
    )
    (o.sum() + state.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all() and torch.isfinite(g.grad).all()
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, starts)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)


def test_gradients_match_recurrence() -> None:
    q, k, v, g, beta = (x.requires_grad_() for x in inputs(seq=13))
    init = torch.randn(B, H, DK, DV, dtype=torch.float64, requires_grad=True)
    starts = starts_at([6], [4, 5], seq=13)
    starts[1, 0] = False
    weights = torch.randn(B, 13, H, DV, dtype=torch.float64), torch.randn(B, H, DK, DV, dtype=torch.float64)
    leaves = (q, k, v, g, beta, init)

    def grads(fn, **kw):
        o, state = fn(q, k, v, g, beta, starts, init, **kw)
        return torch.autograd.grad((o * weights[0]).sum() + (state * weights[1]).sum(), leaves)

    for got, want in zip(grads(chunked_gated_delta_rule, chunk_size=4), grads(naive_gated_delta_rule)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("starts", DOCUMENTS, ids=["no-docs", "docs"])
@pytest.mark.parametrize("chunk", [4, 16])
def test_state_transition_is_the_linear_part(starts, chunk: int) -> None:
    q, k, v, g, beta = inputs()
    init = torch.randn(B, H, DK, DV, dtype=torch.float64)
    if starts is not None:
        starts = starts.clone()
        starts[:, 0] = False  # the initial state must reach the first document for M to be non-trivial
    m = chunk_state_transition(k, g, beta, starts, chunk_size=chunk)
    _, with_init = naive_gated_delta_rule(q, k, v, g, beta, starts, init)
    _, from_zero = naive_gated_delta_rule(q, k, v, g, beta, starts)
    torch.testing.assert_close(m @ init + from_zero, with_init, atol=1e-12, rtol=0)
    if starts is not None:  # a row with a later reset forgets the initial state: M = 0
        assert m.abs().max() == 0


def test_state_transition_without_resets_is_not_trivial() -> None:
    _, k, _, g, beta = inputs(seq=6)
    m = chunk_state_transition(k, g, beta, chunk_size=4)
    assert (m - torch.eye(DK, dtype=m.dtype)).abs().max() > 1e-3 and m.abs().max() > 1e-3


def test_packed_documents_equal_separate_runs() -> None:
    q, k, v, g, beta = inputs(seq=20)
    starts = starts_at([9], [9], seq=20)
    o, state = chunked_gated_delta_rule(q, k, v, g, beta, starts, chunk_size=4)
    first = chunked_gated_delta_rule(*(x[:, :9] for x in (q, k, v, g, beta)), chunk_size=4)[0]
    second, end = chunked_gated_delta_rule(*(x[:, 9:] for x in (q, k, v, g, beta)), chunk_size=4)
    torch.testing.assert_close(o[:, :9], first, atol=1e-12, rtol=0)
    torch.testing.assert_close(o[:, 9:], second, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, end, atol=1e-12, rtol=0)


def test_continuing_from_the_final_state_equals_one_run() -> None:
    q, k, v, g, beta = inputs(seq=22)
    starts = starts_at([5], [14], seq=22)
    whole, end = chunked_gated_delta_rule(q, k, v, g, beta, starts, chunk_size=4)
    head, mid = chunked_gated_delta_rule(
        *(x[:, :10] for x in (q, k, v, g, beta)), starts[:, :10], chunk_size=4
    )
    tail, end2 = chunked_gated_delta_rule(
        *(x[:, 10:] for x in (q, k, v, g, beta)), starts[:, 10:], mid, chunk_size=4
    )
    torch.testing.assert_close(torch.cat([head, tail], 1), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(end2, end, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# causal depthwise conv


def test_conv_equals_conv1d_without_documents() -> None:
    x, w = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=False).double()
    conv.weight.data = w[:, None]
    want = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, w), want, atol=1e-12, rtol=0)


def test_conv_documents_equal_separate_runs_and_initial() -> None:
    x, w = torch.randn(2, 12, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    starts = starts_at([5, 6], [10], seq=12)
    y = causal_depthwise_conv(x, w, starts)
    for b, bounds in enumerate([(0, 5, 6, 12), (0, 10, 12)]):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            torch.testing.assert_close(y[b, lo:hi], causal_depthwise_conv(x[b : b + 1, lo:hi], w)[0])
    # initial = the 3 tokens before: the split run equals the whole one unless the row starts a document at 0
    whole = causal_depthwise_conv(x, w)
    tail = causal_depthwise_conv(x[:, 7:], w, initial=x[:, 4:7])
    torch.testing.assert_close(tail, whole[:, 7:], atol=1e-12, rtol=0)
    reset = torch.zeros(2, 5, dtype=torch.bool)
    reset[0, 0] = True
    tail = causal_depthwise_conv(x[:, 7:], w, reset, initial=x[:, 4:7])
    torch.testing.assert_close(tail[0], causal_depthwise_conv(x[:1, 7:], w)[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(tail[1], whole[1, 7:], atol=1e-12, rtol=0)


def test_document_starts() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    want = torch.tensor([[1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(document_starts(ids), want)


# ----------------------------------------------------------------------------------------------------------------
# the module


def model_config(**gdn) -> ModelConfig:
    spec = dict(heads=6, key_heads=3, key_head_dim=8, value_head_dim=12, conv_kernel=4, chunk_size=4) | gdn
    return ModelConfig(d_model=48, norm_eps=1e-6, gdn=GDNConfig(**spec))


def hf_layer():
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = Qwen3NextConfig(
        hidden_size=48, linear_num_value_heads=6, linear_num_key_heads=3, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, num_hidden_layers=1, rms_norm_eps=1e-6,
        layer_types=["linear_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    layer = Qwen3NextGatedDeltaNet(config, layer_idx=0)
    with torch.no_grad():  # non-trivial values for the parameters HF initialises to constants
        layer.dt_bias.normal_()
        layer.norm.weight.uniform_(0.5, 1.5)
    return layer


def test_module_matches_transformers() -> None:
    hf = hf_layer().eval()
    cfg = model_config()
    ours = GatedDeltaNet(cfg)
    ours.load_state_dict(from_hf_gdn_state(hf.state_dict(), cfg))
    x = torch.randn(2, 19, 48)
    with torch.no_grad():
        want = hf(x)
        got = ours(x, AttentionContext())
    assert (got - want).abs().max().item() <= 1e-5
    back = to_hf_gdn_state(ours.state_dict(), cfg)
    assert back.keys() == hf.state_dict().keys()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_module_documents_equal_separate_rows() -> None:
    torch.manual_seed(1)
    ours = GatedDeltaNet(model_config()).double()
    x = torch.randn(1, 14, 48, dtype=torch.float64)
    ids = torch.tensor([[0] * 6 + [1] * 8])
    mask = AttentionMask(causal=True, q_documents=ids, k_documents=ids)
    packed = ours(x, AttentionContext(mask=mask))
    torch.testing.assert_close(packed[:, :6], ours(x[:, :6], AttentionContext()), atol=1e-12, rtol=0)
    torch.testing.assert_close(packed[:, 6:], ours(x[:, 6:], AttentionContext()), atol=1e-12, rtol=0)


def test_module_hooks_are_called() -> None:
    ours = GatedDeltaNet(model_config())
    seen = []

    def scan_hook(scan_fn, q, k, v, g, beta, starts):
        seen.append(("scan", q.shape, g.shape))
        return scan_fn(q, k, v, g, beta, starts=starts)[0]

    def conv_hook(conv_fn, x, weight, starts):
        seen.append(("conv", x.shape, weight.shape))
        return conv_fn(x, weight, starts=starts)

    ours.scan_hook, ours.conv_hook = scan_hook, conv_hook
    ours(torch.randn(1, 5, 48), AttentionContext())
    assert seen == [
        ("conv", torch.Size([1, 5, 2 * 24 + 72]), torch.Size([2 * 24 + 72, 4])),
        ("scan", torch.Size([1, 5, 6, 8]), torch.Size([1, 5, 6])),
    ]


def test_init_weights_draws_gdn_parameters() -> None:
    cfg = model_config()
    model = nn.ModuleDict({"mixer": GatedDeltaNet(cfg)})
    groups = init_groups(model, cfg)
    assert groups["gdn_decays"][0] == ["mixer.A_log"]
    assert groups["gdn_time_steps"][0] == ["mixer.dt_bias"]
    assert set(groups["gdn_convs"][0]) == {"mixer.q_conv", "mixer.k_conv", "mixer.v_conv"}
    assert "mixer.norm_weight" in groups["norms"][0] and "mixer.wo.weight" in groups["output_projections"][0]
    init_weights(model, cfg, seed=3)
    m = model["mixer"]
    a = m.A_log.exp()
    dt = nn.functional.softplus(m.dt_bias)
    assert ((a >= 1) & (a <= 16)).all() and ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert m.q_conv.abs().max() <= 0.5 and m.q_conv.std() > 0.1  # U(+-1/sqrt(4))
    assert torch.equal(m.norm_weight, torch.ones(12))
    before = {n: p.clone() for n, p in m.named_parameters()}
    init_weights(model, cfg, seed=3)
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())


def test_fla_seam_imports_without_fla() -> None:
    assert isinstance(fla.available(), bool)
    cu = fla.packed_sequences(starts_at([3], [], seq=6), 2, 6, "cpu")
    assert cu.tolist() == [0, 3, 6, 12]
    ours = GatedDeltaNet(model_config())
    ours.kernel = lambda *a, **kw: pytest.fail("the kernel is for CUDA tensors only")
    ours(torch.randn(1, 3, 48), AttentionContext())


@pytest.mark.skipif(not (torch.cuda.is_available() and fla.available()), reason="needs CUDA and FLA")
def test_fla_kernel_matches_chunked() -> None:
    q, k, v, g, beta = (x.float().cuda() for x in inputs(seq=64))
    starts = starts_at([10, 33], [40], seq=64).cuda()
    init = torch.randn(B, H, DK, DV, device="cuda")
    starts[1, 0] = False
    o_ref, s_ref = chunked_gated_delta_rule(q, k, v, g, beta, starts, init, chunk_size=16)
    o, state = fla.fla_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, starts, init)
    torch.testing.assert_close(o.float(), o_ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(state, s_ref, atol=5e-2, rtol=5e-2)


def test_recurrence_matches_transformers() -> None:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, g, beta = inputs(torch.float32)
    init = torch.randn(B, H, DK, DV)
    want, want_state = torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    o, state = naive_gated_delta_rule(q, k, v, g, beta, initial_state=init)
    torch.testing.assert_close(o, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(state, want_state, atol=1e-6, rtol=0)
