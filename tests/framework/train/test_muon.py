"""Muon on one process (framework/train/muon.py) against torch.optim.Muon and against the definitions it implements;
the parameter rules of optim.name muon (framework/train/optim.py). The layouts are tests/framework/parallel's."""

from __future__ import annotations

import copy

import pytest
import torch

from framework.config import ModelConfig, Recipe
from framework.config.schema import GDNConfig, LayersConfig, MLAConfig, MoEConfig
from framework.run import materialize_model
from framework.train.muon import MuonAdamW, lr_scale, newton_schulz
from framework.train.optim import build_optimizer, group_names

CPU = torch.device("cpu")


def _recipe(**model: object) -> Recipe:
    sizes = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)
    recipe = Recipe(model=ModelConfig(**sizes | model))
    recipe.optim.name, recipe.optim.lr = "muon", 0.02
    return recipe


def _train(
    model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], steps: int, seed: int = 0
) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16), generator=gen)
        model(x).float().logsumexp(-1).mean().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()


def test_equals_torch_muon_and_adamw_bit_for_bit() -> None:
    """bfloat16 Newton-Schulz with Jordan's lr scale is torch.optim.Muon's algorithm; the other groups are AdamW's."""
    recipe = _recipe()
    recipe.optim.muon.ns_dtype, recipe.optim.muon.lr_scale = "bfloat16", "original"
    model = materialize_model(recipe.model, CPU, 0)
    twin = copy.deepcopy(model)
    groups = group_names(model, recipe.optim)
    params = dict(twin.named_parameters())
    muon = torch.optim.Muon(
        [params[n] for a, _, names in groups if a == "muon" for n in names],
        lr=0.02,
        weight_decay=recipe.optim.weight_decay,
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [params[n] for n in names], "weight_decay": wd}
            for a, wd, names in groups
            if a == "adamw"
        ],
        lr=0.02,
        betas=recipe.optim.betas,
        eps=recipe.optim.eps,
    )
    _train(model, [build_optimizer(model, recipe.optim, CPU)], 5)
    _train(twin, [muon, adamw], 5)
    start = dict(materialize_model(recipe.model, CPU, 0).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert not torch.equal(p, start[name]), name  # every parameter was updated


def test_newton_schulz_orthogonalises_each_expert() -> None:
    """[E, m, n] is E matrices: each comes out as that matrix's own iteration (not the stacked [E*m, n]'s), with
    singular values in the quintic's band around 1 (Jordan et al.: about 0.7 to 1.2)."""
    g = torch.randn(3, 8, 20, generator=torch.Generator().manual_seed(0))
    g[1] *= 100.0  # per-matrix normalisation: one expert's scale does not leak into another's
    batched = newton_schulz(g, 5, torch.float32)
    for e in range(3):
        torch.testing.assert_close(batched[e], newton_schulz(g[e], 5, torch.float32), rtol=1e-5, atol=1e-6)
        sv = torch.linalg.svdvals(batched[e])
        assert sv.min() > 0.6 and sv.max() < 1.3, sv
    stacked = newton_schulz(g.reshape(24, 20), 5, torch.float32).reshape(3, 8, 20)
    assert (stacked - batched).abs().max() > 0.1
    tall = newton_schulz(g.mT, 5, torch.float32)  # iterated transposed: the same factor, transposed
    torch.testing.assert_close(tall, batched.mT, rtol=1e-5, atol=1e-6)


def test_matched_rms_update_is_a_fifth_of_lr() -> None:
    """Moonlight's scale 0.2*sqrt(max(m, n)): an orthogonal m x n update has RMS 1/sqrt(max(m, n)), so the step's
    RMS is 0.2*lr whatever the shape, AdamW's typical update RMS (no weight decay here, one step from zero
    momentum)."""
    for shape in ((16, 48), (48, 16), (32, 32)):
        w = torch.nn.Parameter(torch.zeros(shape))
        recipe = _recipe()
        recipe.optim.weight_decay = 0.0
        groups = [{"params": [w], "weight_decay": 0.0, "algorithm": "muon"}]
        optimizer = MuonAdamW(groups, recipe.optim, CPU, fused=False)
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        optimizer.step()
        rms = w.detach().pow(2).mean().sqrt().item()
        assert 0.15 * 0.02 < rms < 0.25 * 0.02, (shape, rms)
    assert lr_scale((16, 48), "original") == 1.0 and lr_scale((48, 16), "original") == pytest.approx(3**0.5)


def test_rules_give_muon_the_hidden_matrices_only() -> None:
    """Embeddings, the output head, norms, biases, convolutions and 1-D parameters go to AdamW; linear and expert
    weights (MoE stacks, MLA's low-rank projections, Gated DeltaNet's projections) to Muon; globs override."""
    recipe = _recipe(
        mlp="swiglu",
        bias=True,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, first_dense=1, expert_linear_bias=True),
        layers=LayersConfig(pattern=["gdn", "mla"]),
        gdn=GDNConfig(heads=2, key_heads=2, key_head_dim=8, value_head_dim=8),
        mla=MLAConfig(kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
    )
    model = materialize_model(recipe.model, CPU, 0)
    groups = {(a, wd): names for a, wd, names in group_names(model, recipe.optim)}
    muon = set(groups[("muon", recipe.optim.weight_decay)])
    assert {
        "layers.0.gdn.wq.weight",
        "layers.1.attention.wkv_a.weight",
        "layers.1.feed_forward.experts.w1",
    } <= muon
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in muon)
    adamw = {n for (a, _), names in groups.items() if a == "adamw" for n in names}
    assert {"tok_embeddings.weight", "output.weight", "layers.0.gdn.q_conv", "layers.0.gdn.A_log"} <= adamw
    assert not any(n.endswith(".bias") or "norm" in n for n in muon)
    assert muon | adamw == set(params) and not muon & adamw

    recipe.optim.muon.exclude = ["*.gate.weight"]
    recipe.optim.muon.include = ["*.q_conv"]
    moved = {n for a, _, names in group_names(model, recipe.optim) if a == "muon" for n in names}
    assert moved == (muon - {"layers.1.feed_forward.router.gate.weight"}) | {"layers.0.gdn.q_conv"}


def test_state_round_trips() -> None:
    """Muon's momentum and AdamW's moments load into a fresh optimizer, which then steps as the original does."""
    recipe = _recipe()
    model = materialize_model(recipe.model, CPU, 0)
    optimizer = build_optimizer(model, recipe.optim, CPU)
    _train(model, [optimizer], 2)
    twin = copy.deepcopy(model)
    again = build_optimizer(twin, recipe.optim, CPU)
    again.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert any("momentum_buffer" in s for s in again.state.values())
    _train(model, [optimizer], 2, seed=1)
    _train(twin, [again], 2, seed=1)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
