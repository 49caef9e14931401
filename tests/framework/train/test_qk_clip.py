"""QK-clip (framework/train/qk_clip.py, optim.qk_clip) against the definitions: the probe's per-head max logit is
the max of the full score matrix over the allowed pairs, and after a clip every head's max logit on the same batch
is min(its max, tau), for multi-head, grouped-query and MLA attention."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import ConfigError, ModelConfig, Recipe
from framework.config.schema import MLAConfig
from framework.models import attention
from framework.models.attention import Attention, max_logits
from framework.run import materialize_model
from framework.train.qk_clip import QKClip
from framework.train.train_module import TrainModule

CPU = torch.device("cpu")


def _naive(q, k, scale, inv_t, allowed) -> torch.Tensor:
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if inv_t is not None:
        s = s * inv_t.view(1, -1, 1, 1)
    return s.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("case", ["causal", "documents", "full"])
def test_probe_is_the_max_over_allowed_scores(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr(attention, "LOGIT_ROWS", 3)  # several chunks of query rows, the last one short
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    inv_t = torch.rand(4, generator=g) + 0.5
    causal = torch.ones(10, 10).tril().bool()
    docs = torch.tensor([0] * 4 + [1] * 6)
    allowed = {
        "causal": causal.expand(2, 1, 10, 10),
        "documents": (causal & (docs[:, None] == docs[None, :])).expand(2, 1, 10, 10),
        "full": torch.ones(2, 1, 10, 10, dtype=torch.bool),
    }[case]
    mask = allowed if case == "documents" else None
    got = max_logits(q, k, 0.35, inv_t, mask, causal=case == "causal")
    torch.testing.assert_close(got, _naive(q, k, 0.35, inv_t, allowed))


MODELS = {
    "mha": {},
    "gqa_bias": {"kv_heads": 2, "bias": True},
    "mla": {
        "layers": {"pattern": ["mla"]},
        "mla": MLAConfig(
            kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
        ),
    },
}


def _model(name: str, layers: int = 1) -> tuple[torch.nn.Module, ModelConfig]:
    """One block by default: a clip then changes nothing upstream of the heads it measures again."""
    from framework.config.schema import LayersConfig

    extra = dict(MODELS[name])
    if "layers" in extra:
        extra["layers"] = LayersConfig(**extra["layers"])
    sizes = dict(vocab_size=64, d_model=32, n_heads=4, ffn_hidden=64, max_seq_len=16)
    cfg = ModelConfig(n_layers=layers, **sizes, **extra)
    model = materialize_model(cfg, CPU, 0)
    with torch.no_grad():  # larger q/k weights: logits well above the tau below
        for name_, p in model.named_parameters():
            if any(part in name_ for part in (".wq", ".wk", ".wkv")):
                p.mul_(6.0)
    return model, cfg


def _maxima(model: torch.nn.Module, clip: QKClip, x: torch.Tensor) -> torch.Tensor:
    clip.start_step()
    model(x)
    return torch.stack([m.max_logit for m in clip.modules.values()])


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_heads_end_at_tau(name: str) -> None:
    model, cfg = _model(name)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    clip = QKClip(model, cfg, tau=1.0, reduce_max=lambda t: None)
    before = _maxima(model, clip, x)
    tau = before.median().item()  # half the heads over tau, half under
    clip.tau = tau
    report = clip.apply()
    after = _maxima(model, clip, x)
    assert report["qk_clipped_heads"] == int((before > tau).sum()) > 0
    assert math.isclose(report["qk_max_logit"], before.max().item(), rel_tol=1e-6)
    torch.testing.assert_close(after, before.clamp(max=tau), rtol=1e-5, atol=1e-5)


def test_train_module_logs_and_clips() -> None:
    model, cfg = _model("gqa_bias", layers=2)
    recipe = Recipe(model=cfg)
    recipe.data.seq_len, recipe.train.global_batch_size, recipe.train.micro_batch_size = 16, 2, 2
    recipe.optim.qk_clip = 0.5
    module = TrainModule(model, recipe, "cpu")
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(2))
    module.train_batch([{"input_ids": x[:, :-1], "labels": x[:, 1:]}])
    stats = module.optim_step()
    assert stats["qk_clipped_heads"] > 0 and stats["qk_max_logit"] > 0.5, stats
    assert all(isinstance(m, Attention) and m.track_logits for m in module.qk_clip.modules.values())


@pytest.mark.parametrize(
    ("model", "parallel", "key"),
    [({"qk_norm": True}, {}, "optim.qk_clip"), ({}, {"cp": 2}, "optim.qk_clip")],
)
def test_refused_where_it_cannot_work(model: dict, parallel: dict, key: str) -> None:
    from framework.config import ParallelConfig

    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16, **model
    )
    recipe = Recipe(model=cfg, parallel=ParallelConfig(**parallel))
    recipe.data.seq_len = 16
    recipe.optim.qk_clip = 50.0
    with pytest.raises(ConfigError) as err:
        recipe.validate()
    assert err.value.key == key


def test_the_clip_is_logged(tmp_path, demo_data) -> None:
    """metrics.jsonl carries qk_max_logit and qk_clipped_heads on every train record (`train` on the demo corpus)."""
    import json

    from train_helpers import demo_run_recipe

    from framework.run import train

    recipe = demo_run_recipe(tmp_path, demo_data, steps=3, global_batch=2, micro_batch=2)
    recipe.optim.name, recipe.optim.qk_clip = "muon", 0.05
    recipe.logging.run_dir, recipe.logging.progress_bar, recipe.logging.tensorboard = (
        str(tmp_path),
        False,
        False,
    )
    train(recipe)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3
    assert all(r["qk_clipped_heads"] > 0 and r["qk_max_logit"] > 0.05 for r in train_rows), train_rows
