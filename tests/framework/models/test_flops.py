"""The FLOP formula and parameter counts (framework/models/flops.py) against brute force and the built model."""

from __future__ import annotations

import pytest
import torch

from framework.config.schema import ModelConfig
from framework.models.flops import (
    attention_flops_per_query,
    flops_per_token,
    forward_flops_per_sequence,
    mean_keys_attended,
    mfu,
    param_counts,
)


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
