import json

import pytest
import torch
from train_helpers import IndexedBatches, make_batches, make_model, make_recipe

from framework.train import (
    Callback,
    MetricsLogger,
    Profiler,
    Trainer,
    TrainModule,
    Validation,
    split_micro_batches,
)
from framework.train.callbacks.metrics_logger import TRAIN_KEYS
from framework.train.metrics import lookup_peak_tflops, peak_tflops, throughput


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trainer(tmp_path, overrides=None, batches=None, callbacks=None, **logger_kwargs):
    recipe = make_recipe(tmp_path, overrides)
    module = TrainModule(make_model(), recipe, "cpu")
    logger = MetricsLogger(recipe.logging, total_steps=recipe.train.steps, **logger_kwargs)
    batches = batches if batches is not None else make_batches(recipe.train.steps)
    return Trainer(module, batches, [logger, *(callbacks or [])], recipe)


def test_jsonl_has_every_metric_at_every_step(tmp_path):
    trainer = _trainer(tmp_path, {"logging.peak_tflops": 2.0}, flops_per_token=1e9)
    last = trainer.fit()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert r["kind"] == "train" and set(TRAIN_KEYS) <= r.keys()
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["lr"] == pytest.approx(1e-2)
        assert r["tokens_per_s"] > 0 and r["step_time"] > 0 and r["skipped"] is False
        # tokens/s x FLOPs/token = FLOP/s; MFU against the overridden 2 TFLOP/s peak.
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * 1e9 / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 2.0)
    assert [r["tokens"] for r in records] == [32 * i for i in range(1, 7)]
    assert last["step"] == 6 and records[-1]["loss"] == last["loss"]


def test_log_every_and_cpu_mfu_is_null(tmp_path):
    _trainer(tmp_path, {"logging.log_every": 4}, flops_per_token=1e9).fit()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [4, 6]  # every 4 steps and the last one
    assert records[0]["mfu"] is None and records[0]["tflops"] > 0  # CPUs have no peak-table entry
    assert records[0]["tokens_per_s"] > 0


def test_validation_every_n_steps_and_at_the_end(tmp_path):
    val = make_batches(3, seed=7)
    overrides = {"train.steps": 5, "train.eval_every": 2, "train.eval_batches": 2}
    recipe = make_recipe(tmp_path, overrides)
    trainer = _trainer(tmp_path, overrides, callbacks=[Validation.from_recipe(val, recipe.train)])
    trainer.fit()
    vals = [r for r in _records(tmp_path) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4, 5]
    model = trainer.train_module.model
    with torch.no_grad():  # the final validation, recomputed by hand on the first two batches
        losses = [
            torch.nn.functional.cross_entropy(
                model(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), reduction="sum"
            )
            for b in val[:2]
        ]
    tokens = sum(int((b["labels"] != -100).sum()) for b in val[:2])
    assert vals[-1]["val_loss"] == pytest.approx(float(sum(losses)) / tokens, rel=1e-6)
    assert vals[-1]["val_tokens"] == tokens and vals[-1]["val_batches"] == 2


def test_tensorboard_and_progress_bar(tmp_path, capsys):
    _trainer(tmp_path, {"logging.tensorboard": True, "logging.progress_bar": True, "train.steps": 2}).fit()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "2/2" in capsys.readouterr().err


class _Recorder(Callback):
    def __init__(self, fail_at: int | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_step_start(self, trainer):
        self.calls.append("step_start")

    def on_before_optim_step(self, trainer, stats):
        self.calls.append(f"before_optim:{stats['step']}")
        if stats["step"] == self.fail_at:
            raise RuntimeError("boom")
        return None

    def on_step_end(self, trainer, metrics):
        self.calls.append(f"step_end:{metrics['step']}")

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")

    def on_close(self, trainer):
        self.calls.append("close")


def test_hook_order(tmp_path):
    recorder = _Recorder()
    _trainer(tmp_path, {"train.steps": 2}, callbacks=[recorder]).fit()
    step = ["step_start", "before_optim:{}", "step_end:{}"]
    expected = ["fit_start"] + [c.format(i) for i in (1, 2) for c in step] + ["fit_end", "close"]
    assert recorder.calls == expected


def test_close_runs_after_an_exception(tmp_path):
    recorder = _Recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, callbacks=[recorder]).fit()
    assert recorder.calls[-1] == "close" and "fit_end" not in recorder.calls


def test_micro_batches_are_cut_and_grouped(tmp_path):
    overrides = {"train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 2}
    # The source yields 4-row batches: each step takes two of them, cut into four 2-row micro-batches.
    trainer = _trainer(tmp_path, overrides, batches=make_batches(4, batch=4))
    calls = []
    original = trainer.train_module.train_batch
    trainer.train_module.train_batch = lambda mbs: (
        calls.append([mb["input_ids"].shape for mb in mbs]),
        original(mbs),
    )[1]
    trainer.fit()
    assert calls == [[torch.Size([2, 8])] * 4] * 2
    assert split_micro_batches(make_batches(1, batch=4)[0], 3)[1]["labels"].shape == (1, 8)


def test_batches_that_do_not_tile_the_step_are_an_error(tmp_path):
    overrides = {"train.global_batch_size": 8, "train.micro_batch_size": 2}
    with pytest.raises(ValueError, match="expected 4"):
        _trainer(tmp_path, overrides, batches=make_batches(4, batch=6)).fit()


def test_data_running_out_stops_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="ran out after 3 steps"):
        last = _trainer(tmp_path, batches=IndexedBatches(make_batches(3))).fit()
    assert last["step"] == 3


def test_should_stop_ends_after_the_current_step(tmp_path):
    class StopAt2(Callback):
        def on_step_end(self, trainer, metrics):
            trainer.should_stop = metrics["step"] == 2

    assert _trainer(tmp_path, callbacks=[StopAt2()]).fit()["step"] == 2


def test_profiler_writes_a_trace(tmp_path):
    _trainer(
        tmp_path, {"train.steps": 3}, callbacks=[Profiler(tmp_path / "prof", wait=0, warmup=1, active=1)]
    ).fit()
    assert list((tmp_path / "prof").iterdir())


def test_step_trace_records_exactly_the_asked_step(tmp_path):
    """logging.profile_step: a Chrome trace and the top ops of that one step, written where the recipe says (via
    default_callbacks, as a run builds them); the trace holds one ProfilerStep, the one asked for."""
    from framework.config import ConfigError
    from framework.train.callbacks import StepTrace, default_callbacks

    recipe = make_recipe(tmp_path, {"logging.profile_step": 3})
    callbacks = default_callbacks(recipe, checkpoints=False)
    assert any(isinstance(c, StepTrace) for c in callbacks)
    Trainer(TrainModule(make_model(), recipe, "cpu"), make_batches(6), callbacks, recipe).fit()
    out = tmp_path / "profile"
    trace = json.loads((out / "step_3.trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 1, steps
    top = json.loads((out / "step_3.top_kernels.json").read_text())
    assert 0 < len(top) <= 15 and all(t["ms"] >= 0 and t["on"] == "cpu" for t in top)
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert any("addmm" in t["name"] or "mm" in t["name"] for t in top)  # the matmuls ran in that step
    with pytest.raises(ConfigError, match="logging.profile_step"):
        make_recipe(tmp_path, {"logging.profile_step": 1})


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA RTX A4000", None),
        ("cpu", None),
    ],
)
def test_peak_table(name, peak):
    assert lookup_peak_tflops(name) == peak


def test_peak_override_and_throughput():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=1.5) == 1.5
    rates = throughput(tokens=2000, seconds=2.0, flops_per_token=6e9, peak=12.0)
    assert rates == pytest.approx({"tokens_per_s": 1000.0, "tflops": 6.0, "mfu": 0.5})
    assert throughput(10, 1.0, None, 12.0)["mfu"] is None


def test_fit_again_continues_after_a_stop(tmp_path):
    class StopEvery2(Callback):
        def on_step_end(self, trainer, metrics):
            trainer.should_stop = metrics["step"] % 2 == 0

    trainer = _trainer(tmp_path, callbacks=[StopEvery2()])
    assert [trainer.fit()["step"] for _ in range(3)] == [2, 4, 6]
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]  # one JSONL, appended across fits


def test_fresh_fit_seeds_dropout_from_train_seed(tmp_path):
    def losses(run_dir):
        recipe = make_recipe(run_dir, {"train.seed": 5, "train.steps": 2})
        module = TrainModule(make_model(dropout=0.5), recipe, "cpu")
        torch.manual_seed(run_dir.name.__hash__() % 1000)  # whatever the caller's generator state was
        logger = MetricsLogger(recipe.logging, total_steps=2)
        Trainer(module, make_batches(2), [logger], recipe).fit()
        return [r["loss"] for r in _records(run_dir)]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
