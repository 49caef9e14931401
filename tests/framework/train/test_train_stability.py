import json
import random

import pytest
import torch
from train_helpers import make_batches, make_model, make_recipe

from framework.train import Stability, Trainer, TrainingHalted, TrainModule
from framework.train.callbacks import MetricsLogger


class _FakeTrainer:
    step = 0


def _accepted(stability: Stability, loss: float, step: int = 0) -> None:
    metrics = {"step": step, "loss": loss, "grad_norm": 1.0, "skipped": False, "consecutive_skips": 0}
    stability.on_step_end(_FakeTrainer(), metrics)


def _stability(tmp_path, sigma=3.0, window=20, policy="skip", max_skips=20) -> Stability:
    overrides = {
        "train.spike_sigma": sigma,
        "train.spike_window": window,
        "train.spike_policy": policy,
        "train.max_consecutive_skips": max_skips,
        "checkpoint.every": 10,  # a rewind needs checkpoints to go back to
    }
    return Stability(make_recipe(tmp_path, overrides).train, tmp_path)


def test_spike_fires_on_a_spike_and_never_on_bounded_noise(tmp_path):
    stability = _stability(tmp_path)
    rng = random.Random(0)
    # Uniform noise in [1.9, 2.1]: std ~ 0.058, so mean + 3 sigma ~ 2.17 lies above every noise sample.
    for step in range(20):
        assert stability.on_before_optim_step(_FakeTrainer(), {"loss": 5.0}) is None  # window not full yet
        _accepted(stability, rng.uniform(1.9, 2.1), step)
    for step in range(20, 500):
        loss = rng.uniform(1.9, 2.1)
        assert stability.on_before_optim_step(_FakeTrainer(), {"loss": loss}) is None
        _accepted(stability, loss, step)
    assert stability.on_before_optim_step(_FakeTrainer(), {"loss": 2.5}) == "loss_spike"
    threshold = stability.spike_threshold()
    window = list(stability.accepted)
    mean = sum(window) / len(window)
    std = (sum((x - mean) ** 2 for x in window) / len(window)) ** 0.5
    assert threshold == pytest.approx(mean + 3.0 * std)


def test_skipped_losses_stay_out_of_the_window(tmp_path):
    stability = _stability(tmp_path, window=3)
    for loss in (1.0, 1.1, 0.9):
        _accepted(stability, loss)
    stability.on_step_end(_FakeTrainer(), {"loss": 50.0, "skipped": True, "consecutive_skips": 1})
    assert list(stability.accepted) == [1.0, 1.1, 0.9]


def test_disabled_when_sigma_is_zero(tmp_path):
    stability = _stability(tmp_path, sigma=0.0, window=2)
    for loss in (1.0, 1.0, 1.0):
        _accepted(stability, loss)
    assert stability.on_before_optim_step(_FakeTrainer(), {"loss": 1e6}) is None


def test_halt_policy_writes_diagnostics_and_raises(tmp_path):
    stability = _stability(tmp_path, window=5, policy="halt")
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95], start=1):
        _accepted(stability, loss, step)
    with pytest.raises(TrainingHalted, match="loss spike") as error:
        stability.on_before_optim_step(_FakeTrainer(), {"step": 6, "loss": 9.0, "grad_norm": 3.0})
    report = json.loads((tmp_path / "halt_step_00000006.json").read_text())
    assert str(tmp_path / "halt_step_00000006.json") in str(error.value)
    assert report["accepted_losses"] == [2.0, 2.1, 1.9, 2.05, 1.95]
    assert [h["loss"] for h in report["recent_steps"]] == [2.0, 2.1, 1.9, 2.05, 1.95]
    assert [h["grad_norm"] for h in report["recent_steps"]] == [1.0] * 5
    assert report["current"]["loss"] == 9.0 and report["current"]["grad_norm"] == 3.0


def _run(tmp_path, overrides, model, batches):
    recipe = make_recipe(tmp_path, overrides)
    module = TrainModule(model, recipe, "cpu")
    callbacks = [
        MetricsLogger(recipe.logging, total_steps=recipe.train.steps),
        Stability(recipe.train, tmp_path),
    ]
    return module, Trainer(module, batches, callbacks, recipe)


def test_halts_after_max_consecutive_skips(tmp_path):
    model = make_model()
    model.output.register_forward_hook(lambda m, i, out: out * float("nan"))
    module, trainer = _run(
        tmp_path, {"train.max_consecutive_skips": 3, "train.steps": 10}, model, make_batches(10)
    )
    with pytest.raises(TrainingHalted, match="3 consecutive skipped steps"):
        trainer.fit()
    assert module.step == 3 and module.counters.skipped_steps == 3
    report = json.loads((tmp_path / "halt_step_00000003.json").read_text())
    assert [h["skip_reason"] for h in report["recent_steps"]] == ["nonfinite"] * 3
    assert [h["loss"] for h in report["recent_steps"]] == [None] * 3  # NaN is written as null
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # logger closed cleanly, nothing lost


def test_trainer_skips_a_synthetic_spike(tmp_path):
    model = make_model()
    spike_steps = {14}
    calls = {"n": 0}

    def spike(module, inputs, out):  # blows the logits up on one step: a large but finite loss
        calls["n"] += 1
        return out * 30.0 if calls["n"] in spike_steps else out

    model.output.register_forward_hook(spike)
    overrides = {"train.spike_sigma": 6.0, "train.spike_window": 8, "train.steps": 16, "optim.lr": 1e-3}
    module, trainer = _run(tmp_path, overrides, model, make_batches(16))
    snapshots = {}
    trainer.callbacks.append(_Snapshot(snapshots))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["skipped"]] == [14]
    assert records[13]["skip_reason"] == "loss_spike" and records[13]["skipped_steps"] == 1
    assert torch.equal(snapshots[13], snapshots[14])  # the spike step changed nothing


class _Snapshot(Stability.__mro__[1]):  # a plain Callback
    def __init__(self, store):
        self.store = store

    def on_step_end(self, trainer, metrics):
        self.store[metrics["step"]] = trainer.train_module.model.w1.weight.detach().clone()


def test_grad_norm_spikes_count_when_asked(tmp_path):
    """train.spike_grad_norm: the gradient norm has its own window; a steady loss with a jumping norm is a spike."""
    for enabled in (False, True):
        stability = _stability(tmp_path, window=3)
        stability.cfg.spike_grad_norm = enabled
        for loss, norm in ((1.0, 1.0), (1.1, 1.1), (0.9, 0.9)):
            stability.on_step_end(_FakeTrainer(), {"loss": loss, "grad_norm": norm, "skipped": False,
                                                    "consecutive_skips": 0})  # fmt: skip
        verdict = stability.on_before_optim_step(_FakeTrainer(), {"loss": 1.0, "grad_norm": 50.0})
        assert verdict == ("loss_spike" if enabled else None)


def test_rewind_policy_asks_the_trainer_and_needs_checkpoints(tmp_path):
    from framework.config import ConfigError

    stability = _stability(tmp_path, window=3, policy="rewind")
    for loss in (1.0, 1.1, 0.9):
        _accepted(stability, loss)
    trainer = _FakeTrainer()
    trainer.rewind_request = None
    assert stability.on_before_optim_step(trainer, {"loss": 9.0, "grad_norm": 1.0}) == "loss_spike"
    assert trainer.rewind_request.startswith("loss spike: 9")
    with pytest.raises(ConfigError) as err:
        make_recipe(
            tmp_path, {"train.spike_sigma": 3.0, "train.spike_policy": "rewind", "checkpoint.every": 0}
        )
    assert err.value.key == "train.spike_policy"
