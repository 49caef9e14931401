"""Learning-rate schedules as a multiplier of optim.lr, indexed by optimizer update.

Convention: update s = 0, 1, ..., T-1 (T = train.steps) uses lr * multiplier(s). Linear warmup over W updates
ends on the peak: warmup(s) = min(1, (s + 1) / W), so the first update already moves (lr * 1/W, not 0). The decay
then reaches lr * min_lr_ratio exactly on the last update:
  cosine:   r + (1 - r) * (1 + cos(pi * p)) / 2,  p = clamp((s + 1 - W) / (T - W), 0, 1)
  wsd:      1 until the last D = round(decay_fraction * T) updates, then 1 - (1 - r) * p,
            p = clamp((s + 1 - (T - D)) / D, 0, 1)
  constant: 1
The multiplier is min(warmup(s), shape(s)), so a warmup that runs into a short schedule never exceeds the decay.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from framework.config import ScheduleConfig


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _warmup(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def _cosine(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    span = max(1, total_steps - cfg.warmup_steps)
    p = _clamp01((step + 1 - cfg.warmup_steps) / span)
    r = cfg.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))


def _wsd(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    p = _clamp01((step + 1 - (total_steps - decay_steps)) / decay_steps)
    return 1.0 - (1.0 - cfg.min_lr_ratio) * p


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak LR for 0-based optimizer update `step` of `total_steps`."""
    if cfg.name == "cosine":
        shape = _cosine(step, cfg, total_steps)
    elif cfg.name == "wsd":
        shape = _wsd(step, cfg, total_steps)
    elif cfg.name == "constant":
        shape = 1.0
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return min(_warmup(step, cfg.warmup_steps), shape)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    """LambdaLR driving every param group by lr_multiplier; its step() is called once per applied update."""
    return LambdaLR(optimizer, functools.partial(lr_multiplier, cfg=cfg, total_steps=total_steps))


PER_GROUP_KEYS = ("base_lrs", "_last_lr", "lr_lambdas")
"""LambdaLR's state entries that hold one value per param group."""


def scheduler_state_for(state: dict, n_groups: int) -> dict:
    """A saved LambdaLR state for an optimizer with `n_groups` param groups. Every group follows one schedule
    (one base LR, one multiplier), but the group count depends on the layout (optim.py splits groups by parameter
    layout, and a pipeline stage may lack one), so a checkpoint of another layout lists another count."""
    out = dict(state)
    for key in PER_GROUP_KEYS:
        values = state.get(key)
        if isinstance(values, list) and values and len(values) != n_groups:
            out[key] = [values[0]] * n_groups
    return out
