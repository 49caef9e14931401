"""Multi-token prediction (framework/models/mtp.py) against a hand-written composition of its formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.config.schema import ConfigError, ModelConfig, MoEConfig, MTPConfig
from framework.models import build_model, init_weights
from framework.models.moe import MoE
from framework.models.transformer import Transformer
from framework.train.loss import IGNORE_INDEX
from framework.train.mtp_loss import mtp_labels, mtp_loss, take_mtp_logits

VOCAB = 48


def tiny(depth: int = 2, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=32, max_seq_len=32,
        init_std=0.2, mtp=MTPConfig(depth=depth, loss_weight=0.3),
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def built(cfg: ModelConfig) -> torch.nn.Module:
    model = build_model(cfg)
    init_weights(model, cfg, 0)
    # norms start at 1: give them other gains so a swapped norm would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_block(cfg: ModelConfig, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The depth's block run as a one-block stack of its own (hidden states in, hidden states out)."""
    stack = Transformer(cfg.__class__(**{**cfg.__dict__, "n_layers": 1, "mtp": None}), causal=True,
                        n_layers=1, whole=False)  # fmt: skip
    stack.layers["0"].load_state_dict(block.state_dict())
    if hasattr(stack, "norm"):
        del stack.norm
    return stack(x)


def reference_mtp(model: torch.nn.Module, cfg: ModelConfig, ids: torch.Tensor) -> list[torch.Tensor]:
    """DeepSeek-V3 eq. 21-23 written out: h^0 the main normed output, h'^k = M [RMS(Emb(t_{i+k})); RMS(h^{k-1})]."""
    eps = cfg.norm_eps
    model.eval()
    with torch.no_grad():
        h = model.norm(_main_hidden(model, ids))
        out = []
        for k in range(1, cfg.mtp.depth + 1):
            layer = model.mtp[k - 1]
            future = torch.cat([ids[:, k:], ids[:, :k]], dim=1)  # token i + k (the tail is never scored)
            e = model.tok_embeddings.weight[future]
            joined = torch.cat([rms(e, layer.enorm.weight, eps), rms(h, layer.hnorm.weight, eps)], -1)
            h = rms(
                reference_block(cfg, layer.block, joined @ layer.eh_proj.weight.T), layer.norm.weight, eps
            )
            out.append(h @ model.output.weight.T)
    return out


def _main_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    h = model.tok_embeddings(ids)
    for layer in model.layers.values():
        h = layer(h, model._context(torch.arange(ids.shape[1]).expand_as(ids), None, None))
    return h


def ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_and_block_index() -> None:
    cfg = tiny(depth=2, moe=MoEConfig(n_experts=4, top_k=2, first_dense=1, every=2, aux_loss=0.0))
    model = build_model(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert {"mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight", "mtp.0.norm.weight"} <= names
    assert "mtp.1.block.attention.wq.weight" in names
    assert model.mtp[0].eh_proj.weight.shape == (16, 32)
    # the blocks have indices n_layers, n_layers + 1 = 2, 3: with MoE at 1, 3, 5, ... only depth 2's is MoE
    assert isinstance(model.layers["1"].feed_forward, MoE)
    assert not isinstance(model.mtp[0].block.feed_forward, MoE)
    assert isinstance(model.mtp[1].block.feed_forward, MoE)


def test_depth_logits_match_the_formula() -> None:
    cfg = tiny(depth=2)
    model, x = built(cfg), ids()
    expected = reference_mtp(model, cfg, x)
    model.train()  # dropout 0: training differs only in computing the MTP logits
    main = model(x)
    got = take_mtp_logits(model)
    assert got is not None and len(got) == 2
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(main, model(x))  # forward still returns the main logits
    assert model.mtp_logits is None  # evaluation computes no MTP logits


def test_only_future_tokens_up_to_depth_reach_a_depth() -> None:
    """Depth k at position i sees tokens <= i + k: changing token j changes depth-k logits at i >= j - k only."""
    model, x = built(tiny(depth=2)), ids(1, 12)
    model.train()
    model(x)
    before = take_mtp_logits(model)
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % VOCAB
    model(y)
    after = take_mtp_logits(model)
    for k, (a, b) in enumerate(zip(before, after, strict=True), 1):
        moved = (a - b).abs().amax(-1)[0] > 1e-6
        assert not moved[: 8 - k].any() and moved[8 - k]


def test_loss_is_main_plus_weighted_mean_and_gradients_reach_every_part() -> None:
    cfg = tiny(depth=2)
    model, x = built(cfg), ids()
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    model.train()
    main = model(x)
    logits = take_mtp_logits(model)
    total = (labels != IGNORE_INDEX).sum()
    out = mtp_loss(logits, labels, total, 0.3)
    # naive: CE_k over positions whose label i + k + 1 exists, each divided by the main labelled count
    naive = []
    for k, lg in enumerate(logits, 1):
        keep = labels[:, k:]
        ce = F.cross_entropy(
            lg[:, : 12 - k].flatten(0, 1), keep.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        naive.append(ce / total)
    torch.testing.assert_close(out.depths, torch.stack(naive).detach())
    torch.testing.assert_close(out.loss, 0.3 * (naive[0] + naive[1]) / 2)
    main_ce = F.cross_entropy(main.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    (main_ce + out.loss).backward()
    for name in ("mtp.0.eh_proj.weight", "mtp.1.block.attention.wq.weight", "mtp.1.norm.weight",
                 "mtp.0.enorm.weight", "tok_embeddings.weight", "output.weight"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mtp_embedding_gradient_comes_from_the_mtp_loss() -> None:
    model, x = built(tiny(depth=1)), ids()
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    model.train()
    model(x)
    out = mtp_loss(take_mtp_logits(model), labels, (labels != IGNORE_INDEX).sum(), 1.0)
    out.loss.backward()  # the MTP loss alone still trains the shared embedding and head
    assert model.tok_embeddings.weight.grad.abs().sum() > 0
    assert model.output.weight.grad.abs().sum() > 0


def test_mtp_labels_shift_left() -> None:
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    assert mtp_labels(labels, 2).tolist() == [[3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_mtp_is_for_decoders_only() -> None:
    with pytest.raises(ConfigError, match="model.mtp"):
        tiny(family="encoder").validate()


def test_layouts_without_mtp_support_are_refused_with_a_fix() -> None:
    from framework.config.schema import ParallelConfig, Recipe

    for parallel, model, needle in (
        (ParallelConfig(cp=2), {}, "parallel.cp: 1"),
        (ParallelConfig(engine="deepspeed"), {}, "parallel.engine: native"),
        (ParallelConfig(tp=2), {"tie_embeddings": True}, "tie_embeddings: false"),
    ):
        recipe = Recipe(model=tiny(**model), parallel=parallel)
        recipe.data.seq_len = 32
        with pytest.raises(ConfigError, match=needle):
            recipe.validate()
