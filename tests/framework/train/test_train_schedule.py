import math

import pytest
import torch

from framework.config import ScheduleConfig
from framework.train.schedule import build_scheduler, lr_multiplier


def _cfg(name: str, warmup: int = 10, min_ratio: float = 0.1, decay_fraction: float = 0.2) -> ScheduleConfig:
    return ScheduleConfig(
        name=name, warmup_steps=warmup, min_lr_ratio=min_ratio, decay_fraction=decay_fraction
    )


def _curve(cfg: ScheduleConfig, total: int) -> list[float]:
    return [lr_multiplier(s, cfg, total) for s in range(total)]


def test_linear_warmup_reaches_peak_on_its_last_step():
    curve = _curve(_cfg("constant", warmup=10), 20)
    assert curve[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert curve[10:] == [1.0] * 10


def test_cosine_matches_closed_form():
    total, warmup, r = 110, 10, 0.1
    curve = _curve(_cfg("cosine", warmup=warmup, min_ratio=r), total)
    for s in range(warmup, total):
        p = (s + 1 - warmup) / (total - warmup)
        assert curve[s] == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert curve[9] == 1.0
    assert curve[59] == pytest.approx(0.55)  # half way: midpoint of peak and floor
    assert curve[-1] == pytest.approx(r)  # the last update runs at the floor
    assert lr_multiplier(500, _cfg("cosine", warmup=warmup, min_ratio=r), total) == pytest.approx(r)


def test_wsd_matches_closed_form():
    total, warmup, r = 100, 10, 0.0
    curve = _curve(_cfg("wsd", warmup=warmup, min_ratio=r, decay_fraction=0.2), total)
    assert curve[10:80] == [1.0] * 70  # stable phase until the last 20 updates
    for s in range(80, 100):
        assert curve[s] == pytest.approx(1.0 - (1.0 - r) * (s + 1 - 80) / 20, abs=1e-12)
    assert curve[89] == pytest.approx(0.5)
    assert curve[-1] == pytest.approx(0.0)


def test_constant_ignores_min_ratio_and_no_warmup_starts_at_peak():
    assert _curve(_cfg("constant", warmup=0, min_ratio=0.3), 5) == [1.0] * 5
    cosine = _curve(_cfg("cosine", warmup=0, min_ratio=0.0), 4)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * (s + 1) / 4)) for s in range(4)])


def test_warmup_running_into_the_decay_is_capped_by_it():
    cfg = _cfg("wsd", warmup=10, min_ratio=0.0, decay_fraction=0.5)
    for s in range(10):
        decay = 1.0 - max(0.0, (s + 1 - 5) / 5)
        assert lr_multiplier(s, cfg, 10) == pytest.approx(min((s + 1) / 10, decay))


def test_scheduler_sets_optimizer_lr_per_update():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    cfg = _cfg("cosine", warmup=3, min_ratio=0.1)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for s in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(s, cfg, 10))
        optimizer.step()
        scheduler.step()
