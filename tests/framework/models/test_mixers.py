"""The per-layer mixer pattern: attention_local, gated attention output, partial rotary, and the registry's
parameter counts, each against an independent reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from framework.config.errors import ConfigError
from framework.config.schema import GDNConfig, LayersConfig, Mamba2Config, ModelConfig, MoEConfig
from framework.convert.hf.mapping import halves_to_interleaved, interleaved_to_halves
from framework.models.attention import Attention, AttentionContext
from framework.models.flops import param_counts
from framework.models.positions import apply_rope, rope_angles
from framework.models.transformer import build_model

BASE = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=40, max_seq_len=64
)


def _logits(
    cfg: ModelConfig, state: dict, ids: torch.Tensor, docs: torch.Tensor | None = None
) -> torch.Tensor:
    model = build_model(cfg)
    model.load_state_dict(state)
    return model(ids, document_ids=docs)


def test_attention_local_block_is_attention_with_its_window_and_theta():
    """A pattern [attention_local, attention] model equals, block by block, a one-window model: block 0 as a
    sliding_window=3 / theta=100 model, block 1 as a plain one (same weights; full_attention_layers [1])."""
    torch.manual_seed(0)
    local = dataclasses.replace(
        BASE,
        layers=LayersConfig(pattern=["attention_local", "attention"], local_window=3, local_rope_theta=100.0),
    )
    state = build_model(local).state_dict()
    ids = torch.randint(0, 64, (2, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    # reference: every block windowed at theta 100 except block 1, which is full -- the same only when the
    # global theta is 100 too, so compare with a local theta equal to the global one
    same_theta = dataclasses.replace(local, rope_theta=100.0)
    reference = dataclasses.replace(same_theta, layers=None, sliding_window=3, full_attention_layers=[1])
    torch.testing.assert_close(_logits(same_theta, state, ids, docs), _logits(reference, state, ids, docs))
    # and the local theta does reach block 0: a different global theta changes nothing there
    assert not torch.allclose(_logits(local, state, ids), _logits(same_theta, state, ids))


def test_gated_attention_output_halves_at_zero_gate():
    """sigmoid(0) = 1/2: a zero gate projection gives exactly half the ungated output (wo is linear)."""
    torch.manual_seed(0)
    gated = Attention(dataclasses.replace(BASE, attention_gate=True))
    plain = Attention(BASE)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("wg")})
    torch.nn.init.zeros_(gated.wg.weight)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(gated(x, AttentionContext()), 0.5 * plain(x, AttentionContext()))


def test_partial_rotary_matches_hf():
    """rope_fraction 0.5 against transformers' partial rotary (Bamba's apply_rotary_pos_emb, rotate_half layout)."""
    from transformers.models.bamba.modeling_bamba import apply_rotary_pos_emb

    cfg = dataclasses.replace(BASE, head_dim=16, rope_fraction=0.5, rope_theta=500.0)
    heads, hd, rotated = 3, 16, 8
    positions = torch.arange(7).expand(2, 7)
    q = torch.randn(2, 7, heads, hd)
    cos, sin = rope_angles(cfg, positions)
    ours = apply_rope(q, cos, sin)
    # HF: q in halves layout, cos/sin over the rotated width, repeated per half
    inv_freq = 500.0 ** -(torch.arange(0, rotated, 2).float() / rotated)
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    rows = q.permute(2, 3, 0, 1).flatten(0, 1)  # [H*D, B, S]: the layout the weight permutations act on
    q_hf = interleaved_to_halves(rows, heads, rotated).unflatten(0, (heads, hd)).permute(2, 3, 0, 1)
    hf, _ = apply_rotary_pos_emb(q_hf, q_hf, emb.cos(), emb.sin(), unsqueeze_dim=2)
    back = halves_to_interleaved(hf.permute(2, 3, 0, 1).flatten(0, 1), heads, rotated)
    back = back.unflatten(0, (heads, hd)).permute(2, 3, 0, 1)
    torch.testing.assert_close(ours, back, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[..., rotated:], q[..., rotated:])


HYBRIDS = {
    "gdn": dataclasses.replace(
        BASE, n_layers=4, layers=LayersConfig(pattern=["gdn", "gdn", "gdn", "attention"]),
        gdn=GDNConfig(heads=4, key_heads=2, key_head_dim=8, value_head_dim=6, chunk_size=4),
        attention_gate=True,
    ),
    "mamba2": dataclasses.replace(
        BASE, n_layers=3, layers=LayersConfig(pattern=["mamba2", "mamba2", "attention"]),
        mamba2=Mamba2Config(heads=6, head_dim=4, state_dim=8, groups=2, chunk_size=4),
    ),
    "mamba2_only": dataclasses.replace(
        BASE, layers=LayersConfig(pattern=["mamba2"], feed_forward=False),
        mamba2=Mamba2Config(heads=4, head_dim=8, state_dim=8, conv_bias=False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_hybrid_param_count_and_names(name):
    """The registry's formulas equal the built model's parameters; names are stable per layer index."""
    cfg = HYBRIDS[name]
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]
    for i, mixer in enumerate(cfg.mixers):
        attr = {"attention": "attention", "gdn": "gdn", "mamba2": "mamba"}[mixer]
        assert any(n.startswith(f"layers.{i}.{attr}.") for n, _ in model.named_parameters())
    assert model(torch.randint(0, 64, (2, 9))).shape == (2, 9, 64)


@pytest.mark.parametrize(
    ("layers", "extra", "key"),
    [
        (LayersConfig(pattern=["attention", "gdn"]), {}, "model.layers.pattern[1]"),
        (LayersConfig(pattern=["mamba2"]), {}, "model.layers.pattern[0]"),
        (LayersConfig(pattern=["attention_local"]), {}, "model.layers.pattern[0]"),
        (LayersConfig(pattern=["attention"] * 3), {}, "model.layers.pattern"),
        (LayersConfig(pattern=[]), {}, "model.layers.pattern"),
        (LayersConfig(pattern=["gdn"]), {"gdn": GDNConfig(heads=6, key_heads=4)}, "model.gdn.key_heads"),
        (LayersConfig(feed_forward=False), {"moe": MoEConfig()},
         "model.layers.feed_forward"),
    ],
)  # fmt: skip
def test_pattern_mistakes_name_the_key(layers, extra, key):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(BASE, layers=layers, **extra).validate()
    assert err.value.key == key


@pytest.mark.parametrize("seq", [64, 200, 512])
def test_recurrent_mixing_flops_equal_torch_flop_counter(seq):
    """The registry's token-mixing formulas against torch's FlopCounterMode on the chunked ops themselves
    (linear in seq_len: the per-token count does not grow with the sequence once it spans a chunk)."""
    from torch.utils.flop_counter import FlopCounterMode

    from framework.models.gdn import chunked_gated_delta_rule
    from framework.models.mamba2 import chunked_ssd
    from framework.models.mixers import MIXERS

    heads, dk, dv, chunk = 3, 8, 12, 32
    cfg = dataclasses.replace(
        BASE, gdn=GDNConfig(heads=heads, key_head_dim=dk, value_head_dim=dv, chunk_size=chunk),
        mamba2=Mamba2Config(heads=heads, head_dim=dv, state_dim=dk, chunk_size=chunk),
    )  # fmt: skip
    q, k, v = torch.randn(1, seq, heads, dk), torch.randn(1, seq, heads, dk), torch.randn(1, seq, heads, dv)
    g, beta = -torch.rand(1, seq, heads), torch.rand(1, seq, heads)
    with FlopCounterMode(display=False) as gdn_count:
        chunked_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)
    bm, cm = torch.randn(1, seq, 1, dk), torch.randn(1, seq, 1, dk)
    with FlopCounterMode(display=False) as mamba_count:
        chunked_ssd(v, torch.rand(1, seq, heads), -torch.rand(heads), bm, cm, chunk)
    padded = -(-seq // chunk) * chunk  # the ops compute whole chunks
    assert gdn_count.get_total_flops() == padded * MIXERS["gdn"].mixing_flops(cfg, padded, None)
    assert mamba_count.get_total_flops() == padded * MIXERS["mamba2"].mixing_flops(cfg, padded, None)
