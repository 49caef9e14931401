"""init_weights / init_groups: per-group std, constants, determinism by (seed, name), meta-device builds."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from framework.config.schema import ModelConfig
from framework.models import build_model, init_groups, init_weights
from framework.models.init import stable_seed

FEATURES = dict(
    qk_norm=True, learned_temperature=True, soft_distance_bias=True, attention_temperature=0.7, bias=True
)
FAMILIES = {
    "decoder": dict(FEATURES, position="rope"),
    "encoder": dict(
        FEATURES, family="encoder", position="learned", norm="layernorm", norm_position="post",
        type_vocab_size=2, embedding_norm=True, mlm_head_transform=True, tie_embeddings=True, output_bias=True,
    ),
    "encoder_decoder": dict(FEATURES, family="encoder_decoder", position="relative_bias", n_decoder_layers=3),
}  # fmt: skip


def small(family: str, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=4, ffn_hidden=24)
    fields.update(FAMILIES[family])
    fields.update(overrides)
    return ModelConfig(**fields)


def initialised(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    init_weights(model, cfg, seed)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_groups_cover_every_parameter_exactly_once(family: str) -> None:
    cfg = small(family)
    model = build_model(cfg)
    grouped = [name for names, _ in init_groups(model, cfg).values() for name in names]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
    assert list(model.buffers()) == []  # nothing else to initialise


@pytest.mark.parametrize("family", list(FAMILIES))
def test_group_std_within_five_percent_of_spec(family: str) -> None:
    # ~10^5 draws per group: the std estimate is within ~0.5% (3 sigma) of the truth
    cfg = small(
        family, d_model=128, ffn_hidden=384, vocab_size=1000, embedding_init_std=0.05, init_std=0.02,
        relative_buckets=32,
    )  # fmt: skip
    model = initialised(cfg, seed=3)
    params = dict(model.named_parameters())
    groups = init_groups(model, cfg)
    expected = {
        "embeddings": 0.05,
        "matrices": 0.02,
        "output_projections": 0.02 / math.sqrt(2 * 2),  # GPT-2: init_std / sqrt(2 * blocks)
        "decoder_output_projections": 0.02 / math.sqrt(2 * 3),
    }
    for group, (names, std) in groups.items():
        if group not in expected:
            continue
        assert std == pytest.approx(expected[group])
        values = torch.cat([params[n].detach().flatten() for n in names])
        assert values.std().item() == pytest.approx(std, rel=0.05), group
        assert abs(values.mean().item()) < 0.05 * std, group
    assert {"embeddings", "matrices", "output_projections"} <= set(groups)
    assert ("decoder_output_projections" in groups) == (family == "encoder_decoder")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_constant_groups(family: str) -> None:
    cfg = small(family)
    model = initialised(cfg)
    params = dict(model.named_parameters())
    groups = init_groups(model, cfg)
    constants = {"norms": 1.0, "biases": 0.0, "temperatures": math.log(0.7), "distance_weights": 0.0}
    for group, value in constants.items():
        names, std = groups[group]
        assert std == 0.0
        for name in names:
            assert torch.all(params[name] == torch.tensor(value, dtype=torch.float32)), name
    assert any(n.endswith("q_norm.weight") for n in groups["norms"][0])
    assert any(n.endswith("log_temperature") for n in groups["temperatures"][0])


def test_spec_values_follow_config() -> None:
    cfg = small("decoder", init_std=0.03, init_depth_scaled=False, embedding_init_std=None)
    groups = init_groups(build_model(cfg), cfg)
    assert groups["embeddings"][1] == groups["matrices"][1] == groups["output_projections"][1] == 0.03
    names = groups["output_projections"][0]
    assert sorted(names) == sorted(
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("attention.wo", "feed_forward.w2")
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_build_then_init_equals_direct_build(family: str) -> None:
    cfg = small(family)
    torch.manual_seed(123)
    direct = initialised(cfg, seed=7)
    with torch.device("meta"):
        meta = build_model(cfg)
    meta.to_empty(device="cpu")
    init_weights(meta, cfg, seed=7)
    direct_state, meta_state = direct.state_dict(), meta.state_dict()
    assert direct_state.keys() == meta_state.keys()
    for name, value in direct_state.items():
        assert torch.equal(value, meta_state[name]), name


def test_values_depend_only_on_seed_and_name() -> None:
    base = initialised(small("decoder"), seed=5)
    torch.manual_seed(999)  # the global RNG plays no part
    other = initialised(small("decoder", mlp="geglu", qk_norm=False, position="learned"), seed=5)
    other_params = dict(other.named_parameters())
    shared = [n for n, p in base.named_parameters() if n in other_params and other_params[n].shape == p.shape]
    assert "layers.1.attention.wq.weight" in shared and "tok_embeddings.weight" in shared
    assert len(shared) < len(list(base.parameters()))
    for name, p in base.named_parameters():
        if name in shared:
            assert torch.equal(p, other_params[name]), name
    reseeded = dict(initialised(small("decoder"), seed=6).named_parameters())
    assert not torch.equal(reseeded["layers.0.attention.wq.weight"], base.layers["0"].attention.wq.weight)


def test_deeper_model_keeps_the_draws_and_rescales_output_projections() -> None:
    shallow = initialised(small("decoder", n_layers=2), seed=4)
    deep = initialised(small("decoder", n_layers=3), seed=4)
    assert torch.equal(shallow.layers["1"].attention.wq.weight, deep.layers["1"].attention.wq.weight)
    # same standard-normal draws, std init_std / sqrt(2 * L): ratio sqrt(6 / 4)
    ratio = shallow.layers["1"].attention.wo.weight / deep.layers["1"].attention.wo.weight
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(6 / 4)))


def test_pipeline_stage_gets_the_same_values() -> None:
    cfg = small("decoder", n_layers=4)
    full = initialised(cfg, seed=1)
    stage = build_model(cfg)
    del stage.tok_embeddings
    for i in ("0", "1"):
        del stage.layers[i]
    init_weights(stage, cfg, seed=1)
    full_params = dict(full.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, full_params[name]), name


def test_wrapper_prefixes_do_not_change_values() -> None:
    cfg = small("decoder")
    plain = initialised(cfg, seed=2)
    wrapped = torch.compile(build_model(cfg))  # names gain "_orig_mod." (nothing is compiled until called)
    init_weights(wrapped, cfg, seed=2)
    for (name, p), (_, q) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_stable_seed_is_sha256_of_seed_and_name() -> None:
    digest = hashlib.sha256(b"3:layers.0.attention.wq.weight").digest()
    assert stable_seed(3, "layers.0.attention.wq.weight") == int.from_bytes(digest[:8], "little") & (
        2**63 - 1
    )
