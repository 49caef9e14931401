"""tools/gpu_session --dry-run: every phase of the prepared GPU session, on the CPU at tiny sizes, through the
same wrapper the device tool runs (tools/gpu_session), so the script cannot rot before a GPU is lent.

The figures are checked against what the runs themselves wrote (their metrics.jsonl, the profiler's trace), the
CUDA-only targets are left unjudged with a reason, and a session short of time skips or stops phases instead of
overrunning."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("env", "smoke", "gpu_tests", "throughput", "fp8", "profile")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


session = _module("gpu_session")
report = _module("gpu_report")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, demo_data) -> tuple[Path, Path, subprocess.CompletedProcess]:
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("scratch")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "LOOM_GPU_SCRATCH": str(work)}
    proc = subprocess.run(
        [str(ROOT / "tools" / "gpu_session"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, work, proc


def _phase(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_every_phase_runs_and_at_most_eight_files_come_back(dry_run) -> None:
    out, _, proc = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in PHASES:
        result = _phase(out, name)
        assert result["status"] == "ok", (name, result.get("reason"))
        assert result["seconds"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool brings back 8 files at most
    assert "mixers.json" not in files  # an opt-in phase (--only): the default run is at the cap
    assert "session.log" in files and "trace.json.gz" in files


def test_env_names_this_machine(dry_run) -> None:
    import torch

    env = _phase(dry_run[0], "env")
    assert env["dry_run"] is True and env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert not env["libraries"]["transformers"].startswith("absent") and "tools/gpu_session" in env["command"]
    assert env["libraries"]["flash_attn"].startswith("absent")  # not installed here: said, not hidden


def test_smoke_checks_all_pass(dry_run) -> None:
    smoke = _phase(dry_run[0], "smoke")
    assert set(smoke["checks"]) == {"loss falls", "resume", "hf export", "attention kernel"}
    assert all(c["ok"] for c in smoke["checks"].values()), smoke["checks"]


def test_gpu_tests_are_collected_and_skipped_with_their_reason(dry_run) -> None:
    tests = _phase(dry_run[0], "gpu_tests")
    files = {p.name for p in session.gpu_test_files()}
    assert {"test_te_gpu.py", "test_numerics.py", "test_deepspeed_engine.py"} <= files
    assert tests["counts"]["skipped"] == len(tests["cases"]) > 0 and tests["counts"]["failed"] == 0
    assert all(c["message"] for c in tests["cases"])  # each skip says why


def test_throughput_figures_are_the_runs_own_medians(dry_run) -> None:
    out, work, _ = dry_run
    tp = _phase(out, "throughput")
    assert [r["name"] for r in tp["runs"]] == ["compiled_ac_none", "eager_ac_none", "compiled_ac_selective"]
    for run in tp["runs"]:
        lines = (work / "runs" / run["name"] / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
        assert run["steps"] == len(records) == 6
        steady = records[2:]  # the dry run's warm-up: 2 steps
        assert run["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in steady)
        assert run["tflops"] == statistics.median(r["tflops"] for r in steady)
        assert run["loss_last"] == records[-1]["loss"] and run["memory_estimate_gib"] > 0
    assert tp["runs"][2]["overrides"][-1] == "parallel.activation_checkpointing=selective"
    for target in tp["targets"].values():
        assert target["met"] is None and "dry run" in target["reason"]


def test_fp8_really_ran_float8(dry_run) -> None:
    fp8 = _phase(dry_run[0], "fp8")
    names = [r["name"] for r in fp8["runs"]]
    assert names == ["bf16", "torchao_tensorwise", "torchao_rowwise"] and "te_delayed" in fp8["skipped"]
    for name, comparison in fp8["comparisons"].items():
        assert comparison["loss_rel"] > 0, name  # the middle block's matmuls were float8: not bf16's loss
        assert comparison["loss_rel"] < 0.05 and comparison["speedup"] > 0


def test_profile_traces_one_step_with_its_top_ops(dry_run) -> None:
    out = dry_run[0]
    profile = _phase(out, "profile")
    assert profile["configuration"] == _phase(out, "throughput")["best"]
    with gzip.open(out / "trace.json.gz") as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert len(steps) == 1
    top = profile["top_kernels"]
    assert 0 < len(top) <= 15 and top[0]["ms"] >= top[-1]["ms"]


def test_report_renders_every_phase_and_replaces_only_its_section(dry_run, tmp_path) -> None:
    text = report.render(report.load(dry_run[0]))
    assert "dry run on CPU" in text and "compiled_ac_none" in text and "torchao_rowwise" in text
    assert all(f"| {name} | ok |" in text for name in PHASES)
    doc = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    doc.write_text(original)
    report.update(doc, text)
    head, tail = original.split(report.BEGIN)[0], original.split(report.END)[1]
    new = doc.read_text()
    assert new.startswith(head + report.BEGIN) and new.endswith(report.END + tail) and text in new


def test_mixers_phase_runs_when_named_and_is_reported(tmp_path) -> None:
    assert session.run_session(tmp_path, budget=60, dry_run=True, only={"mixers"}) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixers.json", "session.log"]
    mixers = _phase(tmp_path, "mixers")
    assert mixers["status"] == "ok" and mixers["exit_status"] == 0 and "--quick" in mixers["command"]
    assert [v.split(":")[0] for v in mixers["verdicts"]] == ["gdn", "mamba2", "gdn", "mamba2"]
    assert sum(line.startswith(("| attention |", "| gdn |", "| mamba2 |")) for line in mixers["output"]) == 6
    text = report.render(report.load(tmp_path))
    assert "Sequence mixers (`python benchmarks/mixers.py --quick" in text and mixers["verdicts"][0] in text


def test_a_session_short_of_time_skips_phases_with_the_reason(tmp_path) -> None:
    assert session.run_session(tmp_path, budget=3, dry_run=True, only=None) == 0  # skips are no failure
    for name in PHASES:
        result = _phase(tmp_path, name)
        assert result["status"] == "skipped" and "s left of the session" in result["reason"]


def test_a_phase_keeps_its_deadline_and_one_past_it_is_stopped(tmp_path, demo_data) -> None:
    log = tmp_path / "session.log"
    # told it has 3 s: no configuration fits, each is skipped with the reason, nothing overruns
    kept = session._run_phase_child(session.Phase("throughput", 3, 1), tmp_path, True, 3, log)
    assert kept["status"] == "skipped" and kept["seconds"] < 3 + 5
    assert all(r["status"] == "skipped" and "left of the phase" in r["reason"] for r in kept["runs"])
    # killed at its limit (no grace): importing torch alone takes longer than 0.5 s
    stopped = session._run_phase_child(session.Phase("env", 0.5, 0), tmp_path, True, 0.5, log, grace=0.0)
    assert stopped["status"] == "timeout" and "limit" in stopped["reason"]
    assert _phase(tmp_path, "env")["status"] == "timeout"


def test_scratch_is_marked_and_a_foreign_folder_is_refused(tmp_path, monkeypatch) -> None:
    """_fresh empties subfolders of the scratch folder: only one this script marked as its own."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    monkeypatch.setenv("LOOM_GPU_SCRATCH", str(foreign))
    with pytest.raises(SystemExit, match="not a tools/gpu_session scratch folder"):
        session.scratch()
    assert (foreign / "notes.txt").read_text() == "keep me"
    monkeypatch.setenv("LOOM_GPU_SCRATCH", str(tmp_path / "new"))
    made = session.scratch()
    assert session.owned_kind(made) == session.SCRATCH_KIND and session.scratch() == made


def test_frontier_phase_runs_when_named_and_is_reported(tmp_path) -> None:
    assert session.run_session(tmp_path, budget=60, dry_run=True, only={"frontier"}) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.json", "session.log"]
    frontier = _phase(tmp_path, "frontier")
    assert frontier["status"] == "ok" and frontier["exit_status"] == 0 and "--quick" in frontier["command"]
    assert [v.split(":")[0] for v in frontier["verdicts"]] == ["mtp"]
    assert sum(line.startswith(("| mla |", "| gqa |")) for line in frontier["output"]) == 2
    text = report.render(report.load(tmp_path))
    assert (
        "Frontier blocks (`python benchmarks/frontier.py --quick" in text and frontier["verdicts"][0] in text
    )
