"""MoE layer: the grouped expert computation against a naive per-token loop, the router's selection rules, the
documented capacity drop policy, init by (seed, name), parameter counts and config mistakes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from framework.config.errors import ConfigError
from framework.config.schema import ModelConfig, MoEConfig
from framework.models import build_model, init_groups, init_weights
from framework.models.flops import flops_per_token, param_counts
from framework.models.moe import MoE, capacity_keep, expert_capacity, moe_layers


def config(**moe: object) -> ModelConfig:
    fields = {"n_experts": 4, "top_k": 2, "expert_hidden": 8} | moe
    return ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_hidden=24,
        max_seq_len=16,
        moe=MoEConfig(**fields),
    )


def make_layer(seed: int = 0, cfg: ModelConfig | None = None, **moe: object) -> MoE:
    layer = MoE(cfg if cfg is not None else config(**moe))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: a Python loop over tokens and their chosen experts, with the expert MLP written out."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = layer.router(tokens)
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for k in range(routing.experts.shape[1]):
            if keep is not None and not keep[t, k]:
                continue
            e = int(routing.experts[t, k])
            hidden = F.silu(w1[e] @ tokens[t]) * (w3[e] @ tokens[t])
            out[t] += routing.weights[t, k] * (w2[e] @ hidden)
    shared = getattr(layer, "shared_experts", None)
    if shared is not None:
        gate = getattr(layer, "shared_expert_gate", None)
        scale = (
            torch.ones(tokens.shape[0]) if gate is None else 1 / (1 + torch.exp(-(tokens @ gate.weight[0])))
        )
        out = out + scale[:, None] * shared(tokens)
    return out.view(x.shape)


@pytest.mark.parametrize(
    "moe",
    [
        {},
        {"router": "sigmoid", "n_shared_experts": 1, "route_scale": 2.5},
        # Qwen3-Next: one shared expert of its own width behind a per-token sigmoid gate
        {"n_shared_experts": 1, "shared_expert_hidden": 12, "shared_expert_gate": True},
        {"n_experts": 8, "top_k": 3, "n_groups": 4, "topk_groups": 2, "renormalize": False},
    ],
)
def test_grouped_experts_match_a_per_token_loop(moe: dict) -> None:
    layer = make_layer(**moe).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_gradients_match_the_per_token_loop() -> None:
    layer = make_layer()
    x = torch.randn(2, 5, 16)
    layer(x).square().sum().backward()
    grouped = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    naive_moe(layer, x).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grouped[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_softmax_topk_weights_are_renormalised_chosen_probabilities() -> None:
    layer = make_layer().eval()
    x = torch.randn(7, 16)
    routing = layer.router(x)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(routing.experts, top.indices)
    torch.testing.assert_close(routing.weights, top.values / top.values.sum(-1, keepdim=True))


def test_selection_bias_changes_the_choice_but_not_the_weights() -> None:
    layer = make_layer(router="sigmoid", bias_update_rate=0.1, renormalize=False).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 always chosen
    routing = layer.router(x)
    scores = (x @ layer.router.gate.weight.t()).sigmoid()
    assert (routing.experts == 3).any(dim=-1).all()
    torch.testing.assert_close(routing.weights, scores.gather(-1, routing.experts))  # unbiased scores


def test_group_limited_routing_picks_only_from_the_best_groups() -> None:
    layer = make_layer(n_experts=8, top_k=2, n_groups=4, topk_groups=1).eval()
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.0, 0.0, 0.8, 0.0]])
    # group sums of the two best: g0 = 0.9, g1 = 1.0, g2 = 0.0, g3 = 0.8 -> only g1 (experts 2, 3) is allowed
    assert sorted(layer.router._select(scores)[0].tolist()) == [2, 3]


def test_jitter_only_in_training() -> None:
    layer = make_layer(jitter=0.5)
    x = torch.randn(3, 4, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def reference_keep(experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """The documented policy, literally: walk first choices of all tokens in token order, then second choices,
    and keep an assignment while its expert has fewer than `capacity` kept ones."""
    n, k = experts.shape
    keep = torch.zeros(n, k, dtype=torch.bool)
    used: dict[int, int] = {}
    for rank in range(k):
        for t in range(n):
            e = int(experts[t, rank])
            if used.get(e, 0) < capacity:
                keep[t, rank] = True
                used[e] = used.get(e, 0) + 1
    return keep


def test_capacity_drops_exactly_the_documented_assignments() -> None:
    # 4 tokens, top-2 over 3 experts, capacity 2. First choices: 0,0,0,1 -> token 2's first choice is dropped
    # (expert 0 is full after tokens 0, 1). Second choices: 1,2,1,0 -> token 2's (expert 1: token 3's first
    # choice plus token 0's second fill it) and token 3's (expert 0 full) are dropped.
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(capacity_keep(experts, 3, 2), expected)
    assert expert_capacity(0.5, 4, 2, 3) == 2  # ceil(0.5 * 4 * 2 / 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        experts = torch.rand(37, 8, generator=generator).argsort(-1)[:, :3]
        assert torch.equal(capacity_keep(experts, 8, 9), reference_keep(experts, 9))


def test_dropped_assignments_contribute_nothing_and_dropless_drops_none() -> None:
    layer = make_layer(capacity_factor=0.5).eval()
    x = torch.randn(2, 6, 16)
    routing = layer.router(x.reshape(-1, 16))
    keep = reference_keep(routing.experts, expert_capacity(0.5, 12, 2, 4))
    torch.testing.assert_close(layer(x), naive_moe(layer, x, keep), rtol=1e-5, atol=1e-5)
    assert int(layer.last_routing.dropped) == int((~keep).sum()) > 0
    dropless = make_layer().eval()
    dropless(x)
    assert int(dropless.last_routing.dropped) == 0


def test_routing_record_holds_per_sequence_sums() -> None:
    layer = make_layer().eval()
    x = torch.randn(3, 4, 16)
    layer(x)
    record = layer.last_routing
    routing = layer.router(x.reshape(-1, 16))
    probs = routing.probs.view(3, 4, 4)
    torch.testing.assert_close(record.prob_sums, probs.sum(1))
    for b in range(3):
        chosen = routing.experts.view(3, 8)[b]
        assert record.counts[b].tolist() == [int((chosen == e).sum()) for e in range(4)]
    lse = torch.logsumexp(routing.logits, -1)
    torch.testing.assert_close(record.z_sum, lse.square().sum())
    assert record.tokens == 12


def moe_model_config() -> ModelConfig:
    moe = MoEConfig(
        n_experts=4,
        top_k=2,
        expert_hidden=8,
        n_shared_experts=1,
        first_dense=1,
        every=2,
        bias_update_rate=0.01,
    )
    return ModelConfig(
        vocab_size=32, d_model=16, n_layers=4, n_heads=2, ffn_hidden=24, max_seq_len=16, moe=moe
    )


def test_layer_pattern_counts_and_active_parameters() -> None:
    cfg = moe_model_config()
    model = build_model(cfg)
    assert sorted(moe_layers(model)) == ["layers.1.feed_forward", "layers.3.feed_forward"]
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = 3 * 16 * 8
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * expert  # 2 MoE layers x 2 idle experts
    dense = ModelConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2, ffn_hidden=24, max_seq_len=16)
    # per token, an MoE layer multiplies with router (16 x 4), 2 experts and the shared one instead of the MLP
    extra = 2 * 2 * (16 * 4 + 3 * expert - 3 * 16 * 24)  # 2 FLOPs per multiply-add, 2 MoE layers
    assert flops_per_token(cfg, 8, training=False) == pytest.approx(
        flops_per_token(dense, 8, training=False) + extra
    )


def test_gated_shared_expert_parameters_are_counted() -> None:
    """The shared MLP at shared_expert_hidden (not n_shared_experts x expert_hidden) and the d_model gate row."""
    cfg = config(n_shared_experts=1, shared_expert_hidden=12, shared_expert_gate=True)
    model = build_model(cfg)
    shared = model.layers["0"].feed_forward.shared_experts
    assert shared.w1.weight.shape == (12, 16) and model.layers[
        "0"
    ].feed_forward.shared_expert_gate.weight.shape == (1, 16)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    plain_cfg = config(n_shared_experts=1)
    extra = (
        3 * 16 * (12 - 8) + 16
    )  # per MoE layer: the wider shared MLP and the gate row, both used by every token
    assert counts["total"] - param_counts(plain_cfg)["total"] == 2 * extra
    assert counts["active"] - param_counts(plain_cfg)["active"] == 2 * extra
    gained = flops_per_token(cfg, 8, training=False) - flops_per_token(plain_cfg, 8, training=False)
    assert gained == pytest.approx(2 * 2 * extra)  # 2 FLOPs per multiply-add, 2 MoE layers


def test_init_is_by_seed_and_name_per_expert() -> None:
    cfg = moe_model_config()
    a, b = build_model(cfg), build_model(cfg)
    init_weights(a, cfg, seed=3)
    init_weights(b, cfg, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    w1 = a.layers["1"].feed_forward.experts.w1
    assert not torch.equal(w1[0], w1[1])
    assert torch.equal(a.layers["1"].feed_forward.router.expert_bias, torch.zeros(4))
    groups = init_groups(a, cfg)
    assert "layers.1.feed_forward.experts.w2" in groups["output_projections"][0]
    assert "layers.1.feed_forward.router.gate.weight" in groups["matrices"][0]
    assert groups["output_projections"][1] == pytest.approx(0.02 / math.sqrt(8))
    assert "layers.1.feed_forward.router.expert_bias" in a.state_dict()  # in checkpoints


@pytest.mark.parametrize(
    ("moe", "key"),
    [
        ({"top_k": 5}, "model.moe.top_k"),
        ({"first_dense": 2}, "model.moe.first_dense"),
        ({"n_groups": 3}, "model.moe.n_groups"),
        ({"n_groups": 2, "topk_groups": 3}, "model.moe.topk_groups"),
        ({"n_groups": 4, "topk_groups": 1}, "model.moe.top_k"),
        ({"every": 0}, "model.moe.every"),
        ({"capacity_factor": 0.0}, "model.moe.capacity_factor"),
        ({"jitter": 1.5}, "model.moe.jitter"),
        ({"shared_expert_gate": True}, "model.moe.shared_expert_gate"),
        ({"shared_expert_hidden": 12}, "model.moe.shared_expert_hidden"),
        ({"n_shared_experts": 1, "shared_expert_hidden": 0}, "model.moe.shared_expert_hidden"),
    ],
)
def test_moe_mistakes_are_config_errors(moe: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**moe).validate()
    assert err.value.key == key and err.value.fix


def test_moe_needs_a_decoder_without_biases() -> None:
    with pytest.raises(ConfigError, match="model.moe"):
        ModelConfig(family="encoder", moe=MoEConfig()).validate()
    with pytest.raises(ConfigError, match="model.bias"):
        ModelConfig(bias=True, moe=MoEConfig()).validate()
    ModelConfig(bias=True, bias_scope="qkv", moe=MoEConfig()).validate()  # GLM-4.5: q/k/v biases only


def test_a_fixed_selection_bias_is_a_buffer_that_steers_selection_only() -> None:
    """moe.expert_bias keeps the buffer without updates (an imported GLM-4.5 router): selection follows
    scores + bias, weights the scores alone."""
    assert "expert_bias" not in dict(make_layer(router="sigmoid").router.named_buffers())
    layer = make_layer(router="sigmoid", expert_bias=True, renormalize=False).eval()
    assert dict(layer.router.named_buffers())["expert_bias"].abs().sum() == 0
    x = torch.randn(16, 16)  # d_model 16
    scores = layer.router.gate(x).sigmoid()
    layer.router.expert_bias[0] = 10.0  # expert 0 wins every selection
    routing = layer.router(x)
    assert (routing.experts == 0).any(dim=-1).all()
    torch.testing.assert_close(routing.weights, scores.detach().gather(-1, routing.experts))


def _run(layer: MoE, x: torch.Tensor, kernel: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    layer.experts.kernel = kernel  # type: ignore[assignment]
    layer.zero_grad()
    out = layer(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "moe",
    [{}, {"capacity_factor": 0.5}, {"n_experts": 8, "top_k": 1, "capacity_factor": 1.0}],
    ids=["dropless", "dropping", "idle-experts"],
)
def test_grouped_mm_matches_the_expert_loop(moe: dict) -> None:
    """torch._grouped_mm (the CUDA path) against the per-expert loop (the CPU path, the reference): values and
    gradients, with dropped assignments (rows no expert takes) and experts that get no rows."""
    assert hasattr(torch, "_grouped_mm")
    layer = make_layer(**moe)
    x = torch.randn(2, 6, 16)
    loop, loop_grads = _run(layer, x, "loop")
    grouped, grouped_grads = _run(layer, x, "grouped")
    torch.testing.assert_close(grouped, loop, rtol=1e-6, atol=1e-6)
    assert grouped_grads.keys() == loop_grads.keys()
    for name, grad in loop_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_with_no_rows_still_gives_zero_expert_gradients() -> None:
    layer = make_layer()
    counts = torch.zeros(4, dtype=torch.long)
    for kernel in ("loop", "grouped"):
        layer.experts.kernel = kernel  # type: ignore[assignment]
        layer.zero_grad()
        x = torch.randn(0, 16, requires_grad=True)
        layer.experts(x, counts).sum().backward()
        assert layer.experts.w1.grad is not None and not layer.experts.w1.grad.any(), kernel


def test_auto_takes_grouped_mm_on_cuda_bf16_with_aligned_rows_only() -> None:
    from framework.models.moe import grouped_mm_fits

    assert grouped_mm_fits("cuda", torch.bfloat16, (16, 64))
    assert not grouped_mm_fits("cpu", torch.bfloat16, (16, 64))  # the CPU path is the loop
    assert not grouped_mm_fits("cuda", torch.float32, (16, 64))  # torch's own loop fallback on CUDA
    assert not grouped_mm_fits("cuda", torch.bfloat16, (16, 12))  # 24-byte rows: torch refuses them
    layer = make_layer()
    assert not layer.experts.uses_grouped_mm(torch.randn(3, 16))  # auto on CPU
    layer.experts.kernel = "grouped"
    assert layer.experts.uses_grouped_mm(torch.randn(3, 16))


# ------------------------------------------------------------------------------------------- gpt-oss experts
GPT_OSS_MOE = {
    "n_experts": 6,
    "top_k": 3,
    "expert_hidden": 12,
    "router_bias": True,
    "expert_linear_bias": True,
}


def gpt_oss_layer(seed: int = 0) -> MoE:
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_hidden=24,
        max_seq_len=16,
        mlp="clamped_swiglu",
        swiglu_limit=0.8,
        moe=MoEConfig(**GPT_OSS_MOE),
    )  # fmt: skip  (a small limit so the clamps bind on these activations)
    return make_layer(seed, cfg)


def test_gpt_oss_experts_match_transformers() -> None:
    """Clamped SwiGLU, expert and router biases, softmax over the top-k logits: transformers' GptOssMLP with the
    same weights (its gate_up_proj interleaves gate and up columns) gives the same output."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    layer = gpt_oss_layer().eval()
    hf_cfg = GptOssConfig(
        hidden_size=16, intermediate_size=12, num_local_experts=6, num_experts_per_tok=3, swiglu_limit=0.8
    )
    theirs = GptOssMLP(hf_cfg).eval()
    e = layer.experts
    with torch.no_grad():
        theirs.router.weight.copy_(layer.router.gate.weight)
        theirs.router.bias.copy_(layer.router.gate.bias)
        gate_up = torch.stack([e.w1, e.w3], dim=2).flatten(1, 2)  # [E, H, 2, D] -> rows g0 u0 g1 u1 ...
        theirs.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))
        theirs.experts.gate_up_proj_bias.copy_(torch.stack([e.b1, e.b3], dim=-1).flatten(-2))
        theirs.experts.down_proj.copy_(e.w2.transpose(1, 2))
        theirs.experts.down_proj_bias.copy_(e.b2)
    x = torch.randn(2, 7, 16)
    want, _ = theirs(x)
    hidden = torch.cat([F.linear(x.reshape(-1, 16), e.w1[0]), F.linear(x.reshape(-1, 16), e.w3[0])])
    assert (hidden > 0.8).any() and (hidden < -0.8).any()  # the clamps change something
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_biased_experts_grouped_mm_matches_the_loop() -> None:
    layer = gpt_oss_layer()
    x = torch.randn(2, 6, 16)
    loop, loop_grads = _run(layer, x, "loop")
    grouped, grouped_grads = _run(layer, x, "grouped")
    torch.testing.assert_close(grouped, loop, rtol=1e-6, atol=1e-6)
    assert {"experts.b1", "experts.b3", "experts.b2", "router.gate.bias"} <= loop_grads.keys()
    for name, grad in loop_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gpt_oss_parameter_count_and_bias_rule() -> None:
    cfg = ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=16, mlp="clamped_swiglu",
        bias=True, attention_sinks=True, moe=MoEConfig(**GPT_OSS_MOE),
    )  # fmt: skip
    cfg.validate()
    model = build_model(cfg)
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="expert_linear_bias"):
        ModelConfig(bias=True, moe=MoEConfig()).validate()
