"""The end-of-run summary (framework/train/callbacks/summary.py) against its run's own metrics.jsonl, recomputed
here: median tokens/s past the first interval, mean of the last LAST_LOSSES losses, exp(val loss), the committed
checkpoint; its commands parse with loom's own command line; preempted, data-ended, resumed and failed runs."""

from __future__ import annotations

import io
import json
import math
import shlex
import statistics
import time
from pathlib import Path

import pytest
from train_helpers import SignalAt, make_batches, make_model, make_recipe, tiny_debug_recipe

from framework.train import Callback, Checkpointer, MetricsLogger, Trainer, TrainModule
from framework.train.callbacks.preemption import Preempted
from framework.train.callbacks.summary import LAST_LOSSES, RunSummary


def _rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_summary_of_a_real_run_matches_its_metrics(demo_data: Path, tmp_path: Path, capsys) -> None:
    from framework.run import train
    from launcher.cli import build_parser

    recipe = tiny_debug_recipe(tmp_path, demo_data)
    start = time.perf_counter()
    train(recipe)
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out

    train_rows, val_rows = _rows(tmp_path, "train"), _rows(tmp_path, "val")
    (summary,) = _rows(tmp_path, "summary")
    assert len(train_rows) == 12 > LAST_LOSSES  # the loss window is a strict part of the run
    assert summary["step"] == summary["total_steps"] == 12 and summary["status"] == "finished"
    assert summary["tokens"] == train_rows[-1]["tokens"] == 12 * 2 * 128
    assert 0 < summary["wall_time_s"] <= elapsed
    steady = train_rows[1:]  # the first interval is the warm-up
    assert summary["logged_intervals"] == 11 and summary["first_interval_excluded"]
    assert summary["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in steady))
    assert summary["tflops"] == pytest.approx(statistics.median(r["tflops"] for r in steady))
    assert summary["mfu"] is None  # no peak for a CPU
    last_losses = [r["loss"] for r in train_rows[-LAST_LOSSES:]]
    assert summary["train_loss"] == pytest.approx(sum(last_losses) / LAST_LOSSES)
    assert summary["train_loss_count"] == LAST_LOSSES
    assert summary["val_step"] == val_rows[-1]["step"] == 12
    assert summary["val_loss"] == val_rows[-1]["val_loss"]
    assert summary["val_ppl"] == pytest.approx(math.exp(val_rows[-1]["val_loss"]))
    assert summary["skipped_steps"] == 0
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert summary["checkpoint"] == str(latest) and (latest / "COMPLETE").is_file()

    # The commands are real loom commands: they parse, and name the run's recipe copy and checkpoint.
    resume = build_parser().parse_args(shlex.split(summary["resume_command"])[1:])
    assert (resume.command, resume.resume, resume.recipe) == ("train", "auto", str(tmp_path / "recipe.yaml"))
    assert (tmp_path / "recipe.yaml").is_file()
    export = build_parser().parse_args(shlex.split(summary["export_command"])[1:])
    assert (export.command, export.to, export.source) == ("convert", "hf", str(latest))
    assert summary["plot_command"] == f"loom plot {tmp_path} --out {tmp_path / 'loss.png'}"

    assert "loom: run summary (finished: step 12 of 12)" in printed
    assert f"{summary['train_loss']:.4f} (mean of the last {LAST_LOSSES} logged)" in printed
    assert f"{summary['tokens_per_s']:,.0f} tokens/s" in printed and f"{summary['val_loss']:.4f}" in printed
    for key in ("resume_command", "export_command", "plot_command"):
        assert summary[key] in printed


def _trainer(tmp_path: Path, batches: list, *extra: Callback, checkpointer: Checkpointer | None = None):
    recipe = checkpointer.recipe if checkpointer is not None else make_recipe(tmp_path)
    module = TrainModule(make_model(), recipe, "cpu")
    out = io.StringIO()
    summary = RunSummary(recipe, checkpointer=checkpointer, stream=out)
    callbacks = [MetricsLogger(recipe.logging, total_steps=recipe.train.steps), *extra]
    callbacks += [checkpointer] if checkpointer is not None else []
    return Trainer(module, batches, [*callbacks, summary], recipe), out, recipe


def test_a_preempted_run_reports_its_checkpoint(tmp_path: Path) -> None:
    checkpointer = Checkpointer(make_recipe(tmp_path))
    trainer, out, _ = _trainer(
        tmp_path, make_batches(6), SignalAt(checkpointer, 3), checkpointer=checkpointer
    )
    with pytest.raises(Preempted):
        trainer.fit()
    (summary,) = _rows(tmp_path, "summary")
    assert summary["status"] == "preempted" and summary["step"] == 3 and summary["total_steps"] == 6
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step_00000003")
    assert "loom: run summary (preempted by SIGUSR1 after step 3 of 6)" in out.getvalue()
    assert "--resume auto" in out.getvalue()
    assert summary["train_loss"] == pytest.approx(
        statistics.fmean(r["loss"] for r in _rows(tmp_path, "train"))
    )


def test_data_that_runs_out_is_said_and_no_checkpoint_means_no_resume(tmp_path: Path) -> None:
    trainer, out, _ = _trainer(tmp_path, make_batches(4))
    with pytest.warns(UserWarning, match="training data ran out after 4 steps"):
        trainer.fit()
    (summary,) = _rows(tmp_path, "summary")
    assert summary["status"] == "data_ended" and summary["step"] == 4
    assert summary["checkpoint"] is None and summary["resume_command"] is None
    assert summary["export_command"] is None and summary["plot_command"]
    assert summary["val_loss"] is None and summary["val_step"] is None
    text = out.getvalue()
    assert "the training data ran out after step 4 of 6" in text and "loom train" not in text
    assert "no validation in this launch" in text


def test_a_resumed_finished_run_reports_the_checkpoint_it_resumed_from(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, {"checkpoint.save_final": True})
    first, _, _ = _trainer(tmp_path, make_batches(6), checkpointer=Checkpointer(recipe))
    first.fit()
    saved = tmp_path / "checkpoints" / "step_00000006"
    assert _rows(tmp_path, "summary")[-1]["checkpoint"] == str(saved)  # committed by this launch
    again, out, _ = _trainer(tmp_path, make_batches(6), checkpointer=Checkpointer(recipe, resume="auto"))
    with pytest.warns(UserWarning, match="already finished"):
        again.fit()
    summary = _rows(tmp_path, "summary")[-1]
    assert summary["checkpoint"] == str(saved) and summary["status"] == "finished"  # the one it resumed from
    assert (
        summary["logged_intervals"] == 0 and summary["tokens_per_s"] is None and summary["train_loss"] is None
    )
    assert "- (no step timed)" in out.getvalue()


def test_a_failed_run_has_no_summary(tmp_path: Path) -> None:
    class _Fail(Callback):
        def on_step_end(self, trainer, metrics) -> None:
            if metrics["step"] == 2:
                raise RuntimeError("boom")

    trainer, out, _ = _trainer(tmp_path, make_batches(6), _Fail())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert _rows(tmp_path, "summary") == [] and out.getvalue() == ""
    assert [r["step"] for r in _rows(tmp_path, "train")] == [1, 2]


def test_only_rank_zero_reports(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    out = io.StringIO()
    callbacks = [MetricsLogger(recipe.logging, total_steps=6, rank=1), RunSummary(recipe, rank=1, stream=out)]
    Trainer(TrainModule(make_model(), recipe, "cpu"), make_batches(6), callbacks, recipe).fit()
    assert out.getvalue() == "" and not (tmp_path / "metrics.jsonl").exists()
