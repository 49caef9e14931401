"""The FLOP formula and parameter counts (framework/models/flops.py) against brute force and the built model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from framework.config.schema import LayersConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig
from framework.models import build_model
from framework.models.flops import (
    attention_flops_per_query,
    flops_per_token,
    forward_flops_breakdown,
    forward_flops_per_sequence,
    mean_keys_attended,
    mfu,
    param_counts,
)

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=40)
BERT = dict(
    family="encoder",
    norm="layernorm",
    norm_position="post",
    mlp="gelu",
    bias=True,
    position="learned",
    type_vocab_size=2,
    embedding_norm=True,
    mlm_head_transform=True,
    output_bias=True,
    tie_embeddings=True,
)
T5 = dict(family="encoder_decoder", position="relative_bias", mlp="geglu", softmax_scale="none")
VARIANTS = {
    "llama": {},
    "gqa": dict(kv_heads=2),
    "mqa_head_dim": dict(kv_heads=1, head_dim=12),
    "tied": dict(tie_embeddings=True),
    "tied_output_bias": dict(tie_embeddings=True, output_bias=True),
    "untied_output_bias": dict(output_bias=True),
    "bias": dict(bias=True),
    "qkv_bias_gqa": dict(bias=True, bias_scope="qkv", kv_heads=2),  # Qwen2: no o_proj or MLP biases
    "qk_norm_layernorm": dict(qk_norm=True, norm="layernorm"),
    "learned": dict(position="learned"),
    "alibi": dict(position="alibi"),
    "sinusoidal": dict(position="sinusoidal"),
    "relative_bias": dict(position="relative_bias"),
    "nope": dict(position="none"),
    "soft_masking": dict(learned_temperature=True, soft_distance_bias=True, attention_temperature=2.0),
    "relu": dict(mlp="relu"),
    "gelu_post_norm": dict(mlp="gelu", norm_position="post"),
    "geglu_bias": dict(mlp="geglu", bias=True),
    "sliding_window": dict(sliding_window=4),
    "gemma2": dict(
        mlp="geglu",
        sandwich_norm=True,
        norm_weight_offset=True,
        embedding_scale="sqrt_d_model",
        final_logit_softcap=30.0,
        attention_softcap=50.0,
        tie_embeddings=True,
        head_dim=12,
    ),
    "embedding_norm_types": dict(embedding_norm=True, type_vocab_size=3),
    "bert": BERT,
    # multi-token prediction: D more blocks, eh_proj and head matmuls (counted in the training forward)
    "mtp": dict(mtp=MTPConfig(depth=2), kv_heads=2),
    "mtp_tied_window": dict(mtp=MTPConfig(depth=1), tie_embeddings=True, sliding_window=4),
    # Multi-head Latent Attention with odd widths, with and without the query latent, and DeepSeek-V3's head
    "mla": dict(
        layers=LayersConfig(pattern=["mla"]),
        mla=MLAConfig(kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
        n_heads=5,
    ),
    "mla_no_q_lora_mtp": dict(
        layers=LayersConfig(pattern=["mla"]),
        mla=MLAConfig(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
        mtp=MTPConfig(depth=1),
    ),
    "bert_untied_no_bias": {**BERT, "tie_embeddings": False, "bias": False, "norm": "rmsnorm"},
    "t5": T5,
    "t5_untied_deeper_decoder": {**T5, "n_decoder_layers": 3, "tie_embeddings": False},
    "t5_everything": {
        **T5,
        "position": "learned",
        "type_vocab_size": 3,
        "embedding_norm": True,
        "learned_temperature": True,
        "soft_distance_bias": True,
        "bias": True,
        "qk_norm": True,
        "output_bias": True,
        "mlm_head_transform": True,
        "kv_heads": 2,
        "norm": "layernorm",
    },
}


def _cfg(name: str, **overrides: object) -> ModelConfig:
    return ModelConfig(**{**SMALL, **VARIANTS[name], **overrides})


# --------------------------------------------------------------------------------- param counts vs the model
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_param_counts_equal_built_model(name: str) -> None:
    cfg = _cfg(name)
    with torch.device("meta"):
        model = build_model(cfg)
    built = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    counts = param_counts(cfg)
    assert counts["total"] == built
    assert counts["embedding"] + counts["non_embedding"] == counts["total"] == counts["active"]


def test_mtp_moe_param_counts() -> None:
    """The MTP blocks follow the MoE layer rule (block 3 = depth 2 is MoE here): counted, and their idle experts
    left out of `active` like the main stack's."""
    cfg = _cfg("llama", mtp=MTPConfig(depth=2), moe=MoEConfig(n_experts=4, top_k=2, first_dense=1, every=2))
    with torch.device("meta"):
        model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = model.mtp[1].block.feed_forward.experts
    per_expert = sum(p.numel() for p in expert.parameters()) // 4
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * per_expert  # layers.1 and mtp.1.block


def test_embedding_split_matches_module_names() -> None:
    cfg = _cfg("t5_everything")
    with torch.device("meta"):
        model = build_model(cfg)
    tables = ("tok_embeddings.", "pos_embeddings.", "type_embeddings.")
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(tables))
    assert param_counts(cfg)["embedding"] == embedding


def test_llama2_7b_param_count() -> None:
    """The published Llama-2-7B size, 6,738,415,616 parameters."""
    cfg = ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_hidden=11008)
    assert param_counts(cfg)["total"] == 6_738_415_616


# ------------------------------------------------------------------------ matmul FLOPs vs FlopCounterMode
def _counted_flops(
    model: torch.nn.Module, cfg: ModelConfig, batch: int, seq: int, dec: int, train: bool
) -> dict[str, int]:
    """FLOPs torch.utils.flop_counter counts per aten op for one forward (and backward when train)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    kwargs = {}
    if cfg.family == "encoder_decoder":
        kwargs["decoder_input_ids"] = torch.randint(0, cfg.vocab_size, (batch, dec))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, **kwargs)
        if train:  # with model.mtp the depths' logits take part in the loss too
            extra = [lg.float().square().mean() for lg in getattr(model, "mtp_logits", None) or []]
            (out.float().square().mean() + sum(extra)).backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    counts["total"] = counter.get_total_flops()
    return counts


def _dense_pairs(cfg: ModelConfig, seq: int, dec: int) -> int:
    """(query, key) pairs the naive backend computes: it materialises every score, masked or not."""
    if cfg.family != "encoder_decoder":
        return (cfg.n_layers + (cfg.mtp.depth if cfg.mtp is not None else 0)) * seq * seq
    return cfg.n_layers * seq * seq + cfg.decoder_layers * (dec * dec + dec * seq)


COUNTER_CASES = ["llama", "gqa", "mqa_head_dim", "tied", "bias", "relu", "bert", "t5", "t5_everything",
                 "sliding_window", "soft_masking", "alibi", "gemma2", "mtp", "mtp_tied_window"]  # fmt: skip


@pytest.mark.parametrize("name", COUNTER_CASES)
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_flops_match_flop_counter(name: str, backend: str) -> None:
    """Agreement with FlopCounterMode is exact. Projections and heads run as aten.mm / addmm: their FLOPs equal
    our matmul term with either backend. The naive backend's q.k and p.v run as aten.bmm over the full score
    matrix (the mask is applied afterwards), i.e. our attention term at seq_len keys per query; our causal term
    counts only the (seq_len + 1) / 2 keys attended (test_mean_keys_equals_mask_count). SDPA's CPU flash kernel
    is not counted by FlopCounterMode in torch 2.13 (its math fallback with a float mask is), so the sdpa run
    checks the matmul term. Training counts exactly 3 x forward."""
    batch, seq, dec = 2, 12, 5
    cfg = _cfg(name, attention_backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg)
    parts = forward_flops_breakdown(cfg, seq, decoder_len=dec)
    forward = _counted_flops(model, cfg, batch, seq, dec, train=False)
    assert forward.get("aten.mm", 0) + forward.get("aten.addmm", 0) == batch * parts["matmul"]
    if backend == "naive":
        dense_attention = attention_flops_per_query(cfg, _dense_pairs(cfg, seq, dec))
        assert forward["aten.bmm"] == batch * dense_attention
        assert _counted_flops(model, cfg, batch, seq, dec, train=True)["total"] == 3 * forward["total"]


@pytest.mark.parametrize("name", ["mla", "mla_no_q_lora_mtp"])
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_mla_flops_match_flop_counter(name: str, backend: str) -> None:
    """MLA's matmul term (its latent projections counted from the registry) equals the counted mm / addmm with
    either backend; with the naive backend its q.k over nope + rope channels and p.v over v_head_dim equal the
    counted bmm over every (query, key) pair the naive backend materialises. Training counts 3 x forward."""
    batch, seq = 2, 12
    cfg = _cfg(name, attention_backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg)
    parts = forward_flops_breakdown(cfg, seq)
    forward = _counted_flops(model, cfg, batch, seq, 0, train=False)
    assert forward.get("aten.mm", 0) + forward.get("aten.addmm", 0) == batch * parts["matmul"]
    if backend == "naive":
        m, blocks = cfg.mla, cfg.n_layers + (cfg.mtp.depth if cfg.mtp is not None else 0)
        pairs = blocks * seq * seq
        assert forward["aten.bmm"] == batch * pairs * 2 * cfg.n_heads * (m.qk_head_dim + m.v_head_dim)
        assert _counted_flops(model, cfg, batch, seq, 0, train=True)["total"] == 3 * forward["total"]


def test_bidirectional_total_matches_counter() -> None:
    """An encoder attends to every key, so the whole forward formula equals the naive count."""
    cfg = _cfg("bert", attention_backend="naive")
    counted = _counted_flops(build_model(cfg), cfg, 3, 16, 0, train=False)["total"]
    assert counted == 3 * forward_flops_per_sequence(cfg, 16)
    assert 3 * counted == 3 * 16 * flops_per_token(cfg, 16)


# ------------------------------------------------------------------------------------ attention term vs a mask
def _allowed_pairs(seq_len: int, *, causal: bool, window: int | None) -> int:
    """Count (query, key) pairs an explicit boolean mask allows."""
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        allowed &= k <= q
    if window is not None:
        allowed &= q - k < window
    return int(allowed.sum())


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64, 257])
@pytest.mark.parametrize(
    ("causal", "window"), [(False, None), (True, None), (True, 1), (True, 4), (True, 64), (True, 1000)]
)
def test_mean_keys_equals_mask_count(seq_len: int, causal: bool, window: int | None) -> None:
    pairs = _allowed_pairs(seq_len, causal=causal, window=window)
    assert mean_keys_attended(seq_len, causal=causal, window=window) * seq_len == pytest.approx(
        pairs, rel=1e-12
    )


def test_causal_is_half_plus_diagonal() -> None:
    assert mean_keys_attended(100, causal=True) == 50.5
    assert mean_keys_attended(100, causal=False) == 100.0


def test_attention_term_ignores_gqa() -> None:
    mha = ModelConfig(d_model=64, n_heads=8)
    gqa = ModelConfig(d_model=64, n_heads=8, kv_heads=2)
    assert attention_flops_per_query(mha, 10.0) == attention_flops_per_query(gqa, 10.0) == 4 * 8 * 8 * 10


def test_sliding_window_sequence_flops_match_mask() -> None:
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, sliding_window=5)
    full = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, ffn_hidden=48, sliding_window=None)
    seq_len = 33
    saved_pairs = _allowed_pairs(seq_len, causal=True, window=None) - _allowed_pairs(
        seq_len, causal=True, window=5
    )
    diff = forward_flops_per_sequence(full, seq_len) - forward_flops_per_sequence(cfg, seq_len)
    assert diff == pytest.approx(cfg.n_layers * 4 * cfg.d_model * saved_pairs)


# --------------------------------------------------------------------------------------- closed-form checks
def test_training_is_three_forwards() -> None:
    cfg = ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96)
    assert flops_per_token(cfg, 32, training=True) == 3 * flops_per_token(cfg, 32, training=False)


def test_dense_decoder_closed_form() -> None:
    """Llama-style: 6N per token (N = matmul params incl. head) + 6 x 2 x L x d x mean keys (Kaplan/PaLM)."""
    cfg = ModelConfig(vocab_size=1000, d_model=128, n_layers=3, n_heads=4, kv_heads=2, ffn_hidden=256)
    d, kv_width, seq = 128, 2 * 32, 64
    matmul = 3 * (2 * d * d + 2 * d * kv_width + 3 * d * 256) + 1000 * d
    attention = 3 * 4 * d * (seq + 1) / 2
    assert flops_per_token(cfg, seq) == pytest.approx(3 * (2 * matmul + attention))


def test_encoder_decoder_convention() -> None:
    """Per source + target token; cross-attention sees all encoder positions, its k/v run over the encoder."""
    cfg = ModelConfig(
        family="encoder_decoder",
        vocab_size=100,
        d_model=32,
        n_layers=2,
        n_decoder_layers=1,
        n_heads=4,
        ffn_hidden=64,
        mlp="relu",
        position="relative_bias",
    )
    enc, dec, d = 20, 6, 32
    layer = 4 * d * d + 2 * d * 64
    encoder = 2 * enc * (2 * layer + 4 * d * enc)
    decoder = dec * (2 * layer + 4 * d * (dec + 1) / 2)
    cross = 2 * dec * 2 * d * d + 2 * enc * 2 * d * d + dec * 4 * d * enc
    head = dec * 2 * 100 * d
    total = encoder + decoder + cross + head
    assert forward_flops_per_sequence(cfg, enc, decoder_len=dec) == pytest.approx(total)
    assert flops_per_token(cfg, enc, decoder_len=dec, training=False) == pytest.approx(total / (enc + dec))


def test_mfu() -> None:
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_param_counts_split() -> None:
    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, position="learned")
    counts = param_counts(cfg)
    assert counts["embedding"] == 100 * 16 + cfg.max_seq_len * 16
    assert counts["total"] == counts["embedding"] + counts["non_embedding"] == counts["active"]


def test_full_attention_layers_count_causal_keys() -> None:
    """Blocks exempt from the window attend (seq + 1) / 2 keys per query, the others the window's mean."""
    seq = 16
    windowed = forward_flops_breakdown(_cfg("sliding_window"), seq)["attention"]
    causal = forward_flops_breakdown(_cfg("llama"), seq)["attention"]
    mixed = forward_flops_breakdown(_cfg("sliding_window", full_attention_layers=[1]), seq)["attention"]
    assert mixed == pytest.approx((windowed + causal) / 2) and windowed < mixed < causal
