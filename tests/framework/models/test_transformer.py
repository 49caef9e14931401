"""Whole models: properties (causality, windows, documents, prefix-LM), layouts named in docs/contracts.md,
embedding/head formulas, pipeline-stage deletions, backward for every family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_module

from framework.config.schema import ModelConfig
from framework.models import build_model, init_weights
from framework.models.attention import AttentionContext
from framework.models.masks import AttentionMask

VOCAB = 37


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's reference path without a dynamo trace per new score_mod (forward only on CPU)."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def tiny(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=32, max_seq_len=32,
        init_std=0.2,
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)


def built(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    init_weights(model, cfg, seed)
    return model.eval()


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs)


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


POSITIONS = ["rope", "alibi", "sinusoidal", "learned", "relative_bias", "none"]


# ------------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize(
    ("position", "backend"),
    [(p, "sdpa") for p in POSITIONS] + [("rope", "naive"), ("rope", "flex"), ("alibi", "flex")],
)
def test_future_tokens_never_change_earlier_logits(position: str, backend: str) -> None:
    model = built(tiny(position=position, attention_backend=backend, soft_distance_bias=True))
    ids = tokens(2, 10)
    edited = ids.clone()
    edited[:, 6:] = (edited[:, 6:] + 1) % VOCAB
    before, after = logits(model, ids), logits(model, edited)
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=1e-5, rtol=0)
    assert changed(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("backend", ["sdpa", "naive", "flex"])
def test_tokens_outside_the_sliding_window_have_no_influence(backend: str) -> None:
    window, layers, edit = 3, 2, 2
    model = built(tiny(sliding_window=window, n_layers=layers, attention_backend=backend))
    ids = tokens(1, 14)
    edited = ids.clone()
    edited[0, edit] = (edited[0, edit] + 1) % VOCAB
    before, after = logits(model, ids), logits(model, edited)
    # each layer reaches window - 1 tokens back, so the edit is visible up to edit + layers * (window - 1)
    reach = edit + layers * (window - 1)
    torch.testing.assert_close(before[0, reach + 1 :], after[0, reach + 1 :], atol=1e-5, rtol=0)
    assert changed(before[0, edit], after[0, edit]) and changed(before[0, reach], after[0, reach])


# ------------------------------------------------------------------------------------------------ documents


@pytest.mark.parametrize(
    ("family", "position", "backend"),
    [("decoder", p, "sdpa") for p in POSITIONS]
    + [("encoder", p, "sdpa") for p in ("learned", "alibi", "relative_bias", "rope")]
    + [("decoder", "rope", "flex"), ("encoder", "alibi", "flex"), ("decoder", "relative_bias", "naive")],
)
def test_documents_are_isolated_and_positions_restart(family: str, position: str, backend: str) -> None:
    model = built(tiny(family=family, position=position, attention_backend=backend))
    doc_a, doc_b = tokens(1, 5, seed=1), tokens(1, 7, seed=2)
    packed = torch.cat([doc_a, doc_b], dim=1)
    document_ids = torch.tensor([[0] * 5 + [1] * 7])
    out = logits(model, packed, document_ids=document_ids)
    # each document's logits are those of the document alone: no leak, and positions restart at 0
    torch.testing.assert_close(out[:, :5], logits(model, doc_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], logits(model, doc_b), atol=1e-5, rtol=1e-5)
    edited = packed.clone()
    edited[0, :5] = (edited[0, :5] + 3) % VOCAB
    out_edited = logits(model, edited, document_ids=document_ids)
    torch.testing.assert_close(out[:, 5:], out_edited[:, 5:], atol=1e-5, rtol=0)
    assert changed(out[:, :5], out_edited[:, :5])


def test_explicit_positions_override_document_restart() -> None:
    model = built(tiny(position="learned"))
    ids = tokens(1, 6)
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    default = logits(model, ids, document_ids=document_ids)
    explicit = logits(model, ids, document_ids=document_ids, positions=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    shifted = logits(model, ids, document_ids=document_ids, positions=torch.tensor([[0, 1, 2, 3, 4, 5]]))
    torch.testing.assert_close(default, explicit)
    assert changed(default[:, 3:], shifted[:, 3:])


# ------------------------------------------------------------------------------------------------ prefix-LM


@pytest.mark.parametrize("backend", ["sdpa", "naive", "flex"])
def test_prefix_tokens_see_each_other_bidirectionally(backend: str) -> None:
    model = built(tiny(attention_backend=backend))
    ids = tokens(2, 10)
    prefix = torch.tensor([4, 7])
    base = logits(model, ids, prefix_lengths=prefix)
    inside = ids.clone()
    inside[:, 3] = (inside[:, 3] + 1) % VOCAB  # in both prefixes
    out = logits(model, inside, prefix_lengths=prefix)
    assert changed(base[:, 0], out[:, 0])  # an earlier prefix token sees a later one
    after = ids.clone()
    after[:, 8] = (after[:, 8] + 1) % VOCAB  # after both prefixes: still causal
    out = logits(model, after, prefix_lengths=prefix)
    torch.testing.assert_close(base[:, :8], out[:, :8], atol=1e-5, rtol=0)
    # no prefix is plain causal LM
    torch.testing.assert_close(
        logits(model, ids, prefix_lengths=torch.tensor([0, 0])), logits(model, ids), atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------ encoder-decoder


def test_encoder_decoder_directions() -> None:
    model = built(tiny(family="encoder_decoder", position="relative_bias", n_decoder_layers=3))
    src, tgt = tokens(2, 8, seed=1), tokens(2, 6, seed=2)
    base = logits(model, src, decoder_input_ids=tgt)
    assert base.shape == (2, 6, VOCAB)
    src_edit = src.clone()
    src_edit[:, -1] = (src_edit[:, -1] + 1) % VOCAB  # the encoder is bidirectional, cross-attention full
    assert all(changed(base[:, t], logits(model, src_edit, decoder_input_ids=tgt)[:, t]) for t in range(6))
    tgt_edit = tgt.clone()
    tgt_edit[:, 4:] = (tgt_edit[:, 4:] + 1) % VOCAB  # the decoder is causal
    torch.testing.assert_close(base[:, :4], logits(model, src, decoder_input_ids=tgt_edit)[:, :4])
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(src)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        built(tiny())(src, decoder_input_ids=tgt)


def test_t5_relative_bias_is_computed_once_per_stack() -> None:
    cfg = tiny(family="encoder_decoder", position="relative_bias", n_layers=3, softmax_scale="none")
    model = built(cfg)
    calls = {"encoder": 0, "decoder": 0}
    for stack in calls:
        table = getattr(model, stack).relative_bias
        table.register_forward_hook(lambda *_, s=stack: calls.__setitem__(s, calls[s] + 1))
    logits(model, tokens(1, 5), decoder_input_ids=tokens(1, 4))
    assert calls == {"encoder": 1, "decoder": 1}
    assert model.encoder.relative_bias.bidirectional and not model.decoder.relative_bias.bidirectional
    assert model.encoder.layers["0"].attention.scale == 1.0


# ------------------------------------------------------------------------------------------- layout (names)


def _names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def test_decoder_layout() -> None:
    cfg = tiny(n_layers=3, qk_norm=True, learned_temperature=True, soft_distance_bias=True)
    names = _names(build_model(cfg))
    expected_block = {
        "attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
        "attention.wo.weight", "attention.q_norm.weight", "attention.k_norm.weight",
        "attention.log_temperature", "attention.distance_weight", "ffn_norm.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    }  # fmt: skip
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{n}" for i in range(3) for n in expected_block}
    assert names == expected


def test_bert_encoder_layout() -> None:
    cfg = tiny(
        family="encoder", position="learned", norm="layernorm", norm_position="post", bias=True, mlp="gelu",
        type_vocab_size=2, embedding_norm=True, mlm_head_transform=True, tie_embeddings=True, output_bias=True,
    )  # fmt: skip
    model = build_model(cfg)
    names = _names(model)
    top = {n for n in names if not n.startswith("layers.")}
    assert top == {
        "tok_embeddings.weight", "pos_embeddings.weight", "type_embeddings.weight", "embed_norm.weight",
        "embed_norm.bias", "head_transform.dense.weight", "head_transform.dense.bias",
        "head_transform.norm.weight", "head_transform.norm.bias", "output_bias",
    }  # fmt: skip
    assert not hasattr(model, "norm") and not hasattr(model, "output")  # post-norm, tied
    assert "layers.1.feed_forward.w1.bias" in names and "layers.1.feed_forward.w3.weight" not in names


def test_encoder_decoder_layout() -> None:
    cfg = tiny(
        family="encoder_decoder", position="relative_bias", n_decoder_layers=1, soft_distance_bias=True
    )
    model = build_model(cfg)
    names = _names(model)
    assert {"tok_embeddings.weight", "encoder.relative_bias.weight", "encoder.norm.weight"} <= names
    assert {"decoder.relative_bias.weight", "decoder.norm.weight", "output.weight"} <= names
    assert {n.split(".")[2] for n in names if n.startswith("encoder.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in names if n.startswith("decoder.layers.")} == {"0"}
    assert "decoder.layers.0.cross_attention.wq.weight" in names
    assert "decoder.layers.0.cross_attention_norm.weight" in names
    assert "encoder.layers.0.cross_attention.wq.weight" not in names
    # distance has no meaning between decoder and encoder positions
    assert "decoder.layers.0.cross_attention.distance_weight" not in names
    assert model.encoder.relative_bias.weight.shape == (cfg.relative_buckets, cfg.n_heads)


def test_head_dim_independent_of_d_model() -> None:
    model = build_model(tiny(d_model=16, n_heads=4, kv_heads=1, head_dim=12))
    attention = model.layers["0"].attention
    assert attention.wq.weight.shape == (48, 16) and attention.wk.weight.shape == (12, 16)
    assert attention.wo.weight.shape == (16, 48)
    assert logits(model.eval(), tokens(1, 5)).shape == (1, 5, VOCAB)


# ---------------------------------------------------------------------------------- embeddings and the head


def _layer0_input(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.layers["0"].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    logits(model, ids, **kwargs)
    handle.remove()
    return seen[0]


def test_bert_embeddings_formula() -> None:
    cfg = tiny(family="encoder", position="learned", norm="layernorm", type_vocab_size=2, embedding_norm=True)
    model = built(cfg)
    ids, types = tokens(1, 6), torch.tensor([[0, 0, 0, 1, 1, 1]])
    total = (
        model.tok_embeddings.weight[ids]
        + model.pos_embeddings.weight[:6]
        + model.type_embeddings.weight[types]
    )
    mean, var = total.mean(-1, keepdim=True), total.var(-1, unbiased=False, keepdim=True)
    norm = model.embed_norm
    expected = (total - mean) / torch.sqrt(var + cfg.norm_eps) * norm.weight + norm.bias
    torch.testing.assert_close(
        _layer0_input(model, ids, token_type_ids=types), expected, atol=1e-5, rtol=1e-5
    )
    # token types default to 0
    torch.testing.assert_close(
        _layer0_input(model, ids), _layer0_input(model, ids, token_type_ids=torch.zeros_like(ids))
    )


def test_sinusoidal_positions_are_added() -> None:
    model = built(tiny(position="sinusoidal"))
    ids = tokens(1, 5)
    table = torch.tensor(
        [[torch.sin(torch.tensor(p / 10000 ** (2 * (i // 2) / 16))) if i % 2 == 0 else
          torch.cos(torch.tensor(p / 10000 ** (2 * (i // 2) / 16))) for i in range(16)] for p in range(5)]
    )  # fmt: skip
    expected = model.tok_embeddings.weight[ids] + table
    torch.testing.assert_close(_layer0_input(model, ids), expected, atol=1e-5, rtol=1e-5)


def _final_hidden(model: torch.nn.Module, module_name: str, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    seen: list[torch.Tensor] = []
    module = model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    out = logits(model, ids)
    handle.remove()
    return seen[0], out


def test_tied_head_with_bias_uses_token_embedding() -> None:
    model = built(tiny(tie_embeddings=True, output_bias=True))
    with torch.no_grad():
        model.output_bias.normal_()
    hidden, out = _final_hidden(model, "norm", tokens(2, 5))
    expected = hidden @ model.tok_embeddings.weight.T + model.output_bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_mlm_head_transform_formula() -> None:
    cfg = tiny(family="encoder", norm="layernorm", norm_position="post", mlm_head_transform=True, mlp="gelu")
    model = built(cfg)
    hidden, out = _final_hidden(model, "layers.1", tokens(2, 5))
    t = hidden @ model.head_transform.dense.weight.T + model.head_transform.dense.bias
    t = 0.5 * t * (1 + torch.erf(t / 2**0.5))
    t = F.layer_norm(t, (16,), model.head_transform.norm.weight, model.head_transform.norm.bias, cfg.norm_eps)
    torch.testing.assert_close(out, model.output(t), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_residual_formula(norm_position: str) -> None:
    cfg = tiny(norm_position=norm_position, norm="layernorm")
    model = built(cfg)
    block = model.layers["0"]
    ctx = AttentionContext(AttentionMask(causal=True), positions=torch.arange(5)[None])
    x = torch.randn(1, 5, 16)
    attn, ffn = block.attention, block.feed_forward
    with torch.no_grad():
        if norm_position == "pre":  # x + f(norm(x))
            h = x + attn(block.attention_norm(x), ctx)
            expected = h + ffn(block.ffn_norm(h))
        else:  # norm(x + f(x)) (BERT)
            h = block.attention_norm(x + attn(x, ctx))
            expected = block.ffn_norm(h + ffn(h))
        torch.testing.assert_close(block(x, ctx), expected)
    assert hasattr(model, "norm") == (norm_position == "pre")


# -------------------------------------------------------------------------------------------------- dropout


def test_dropout_only_in_training() -> None:
    cfg = tiny(dropout=0.3, attention_dropout=0.2)
    model = built(cfg)
    plain = built(tiny())
    ids = tokens(2, 6)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids))
    model.train()
    with torch.no_grad():
        assert changed(model(ids), model(ids))


# ------------------------------------------------------------------------------------------ pipeline stages


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_compose_to_the_full_model(tied: bool) -> None:
    model = built(tiny(n_layers=4, tie_embeddings=tied, position="alibi"))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for i in ("2", "3"):
        del first.layers[i]
    del first.norm
    if not tied:
        del first.output
    del last.tok_embeddings
    for i in ("0", "1"):
        del last.layers[i]
    if tied:  # the last stage of a tied model needs the table: here it keeps its own copy as `output`
        last.output = torch.nn.Linear(16, VOCAB, bias=False)
        last.output.weight = model.tok_embeddings.weight
    ids = tokens(2, 7)
    hidden = logits(first, ids)
    assert hidden.shape == (2, 7, 16)  # no output module (or tied without the last block): hidden states
    torch.testing.assert_close(logits(last, hidden), logits(model, ids), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- backends and grads

EVERYTHING = dict(
    qk_norm=True, learned_temperature=True, soft_distance_bias=True, attention_temperature=0.8, bias=True,
    position="alibi", n_heads=6, kv_heads=3, head_dim=4,
)  # fmt: skip
FAMILIES = {
    "decoder": dict(EVERYTHING, sliding_window=5, mlp="swiglu"),
    "encoder": dict(
        EVERYTHING, family="encoder", position="learned", norm="layernorm", norm_position="post", mlp="gelu",
        type_vocab_size=2, embedding_norm=True, mlm_head_transform=True, tie_embeddings=True, output_bias=True,
    ),
    "encoder_decoder": dict(
        EVERYTHING, family="encoder_decoder", position="relative_bias", mlp="geglu", gelu_approximate="tanh",
        softmax_scale="none", n_decoder_layers=3, sliding_window=4,
    ),
}  # fmt: skip


def _inputs(family: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = tokens(2, 9)
    kwargs: dict[str, torch.Tensor] = {"document_ids": torch.tensor([[0] * 4 + [1] * 5, [2] * 9])}
    if family == "decoder":
        kwargs["prefix_lengths"] = torch.tensor([2, 5])
    if family == "encoder":
        kwargs["token_type_ids"] = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    if family == "encoder_decoder":
        kwargs["decoder_input_ids"] = tokens(2, 6, seed=1)
    return ids, kwargs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backends_agree_on_the_whole_model(family: str) -> None:
    ids, kwargs = _inputs(family)
    outs = {}
    for backend in ("naive", "sdpa", "flex"):
        model = built(tiny(**FAMILIES[family], attention_backend=backend))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("distance_weight"):
                    p.copy_(torch.linspace(0.0, 0.5, p.numel()))
        outs[backend] = logits(model, ids, **kwargs)
    torch.testing.assert_close(outs["sdpa"], outs["naive"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["flex"], outs["naive"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_reaches_every_parameter(family: str, backend: str) -> None:
    model = built(tiny(**FAMILIES[family], attention_backend=backend)).train()
    ids, kwargs = _inputs(family)
    out = model(ids, **kwargs)
    targets = tokens(*out.shape[:2], seed=3)
    F.cross_entropy(out.flatten(0, 1), targets.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_too_long_sequence_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        built(tiny(max_seq_len=8))(tokens(1, 9))
