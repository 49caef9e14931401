"""The prepared GPU session (docs/gpu.md): everything Loom needs measured on a lent H100/H200, in one command.

    tools/gpu_session [--dry-run] [--out DIR] [--budget SECONDS] [--only PHASE,...]

Phases, in order of value, each with its own time budget (seconds; a phase is skipped, with the reason, when
less than its minimum is left of the whole budget, and stopped at its budget):

  env         GPU, driver, CUDA, torch, NCCL; which optional kernel libraries import; the wheel install's time
  smoke       `loom smoke` (bf16, the default recipe): loss falls, resume, HF export, the attention kernel
  gpu_tests   `pytest -m gpu` over the files that hold gpu-marked tests, with a per-test timeout
  throughput  the 1B Llama recipe at seq 4096, bf16, 30 steps: eager / compiled, AC none / selective;
              tokens/s, TFLOP/s and MFU per GPU, peak memory beside the memory model's estimate
  fp8         torchao float8 (tensorwise, rowwise; TE when importable) against bf16 on the same recipe
  profile     one steady step of the fastest configuration: a Chrome trace and the top 15 kernels
  mixers      (only with --only: the phases above already bring back the device tool's 8 files) benchmarks/
              mixers.py on CUDA: attention / GDN / Mamba-2 fwd+bwd per token, chunked vs naive ops, and the
              kernel libraries (FLA, mamba_ssm) vs the PyTorch chunked ops when they import
  frontier    (only with --only) benchmarks/frontier.py on CUDA, bf16: MLA vs equal-FLOP GQA (the SDPA kernel
              MLA's unequal head dims get, padded to one width) and the MTP depth-1 step overhead

Every phase writes DIR/<phase>.json ({"status": ok | failed | skipped | timeout, "seconds", "reason", ...});
the log is DIR/session.log and the trace DIR/trace.json.gz: eight files at most, what the device tool brings
back. Runs and checkpoints go to a scratch folder outside DIR. `tools/gpu_report.py DIR` renders the figures.

`--dry-run`: the same phases on the CPU at tiny sizes (the debug model on the demo corpus, a few steps each),
with every CUDA-only assertion skipped and the reason recorded. `make test` runs it, so the script cannot rot
before a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from framework.outputs import mark_owned, owned_kind  # noqa: E402

DEFAULT_BUDGET_S = 530  # the device tool's run takes timeout_s <= 600; 540 leaves time to bring files back
WARMUP_STEPS = 3  # first steps left out of the medians: allocator warm-up, autotuning, compilation
MFU_TARGET = 0.50
FP8_SPEEDUP_TARGET = 1.3
FP8_LOSS_TOLERANCE = 0.01
MEMORY_TOLERANCE = 0.10
INSTALL_TARGET_S = 60.0
LIBRARIES = (
    "transformer_engine", "torchao", "flash_attn", "fla", "triton", "transformers", "tokenizers", "deepspeed",
    "sentencepiece", "safetensors", "pyarrow", "webdataset", "zstandard", "pytest_timeout",
)  # fmt: skip
# The 1B recipe's data: the demo corpus prepared at seq 4096 by tools/gpu_prepare (carried to the machine).
LONG_DATA = ROOT / ".gpu" / "data-4096"


SESSION_COMMAND = (
    "run(command='OUT=$OUT tools/gpu_session', carry=['.whl', '.gpu', 'data/demo'], timeout_s=560)"
)
"""How a session calls the device tool (after tools/gpu_prepare); the report quotes it."""


@dataclass(frozen=True)
class Phase:
    name: str
    budget_s: float  # stopped after this long
    min_s: float  # skipped when less than this is left of the session
    default: bool = (
        True  # False: runs only when --only names it (the default run's files are at the cap of 8)
    )


PHASES = (
    Phase("env", 20, 5),
    Phase("smoke", 90, 40),
    Phase("gpu_tests", 90, 30),
    Phase("throughput", 200, 60),
    Phase("fp8", 90, 40),
    Phase("profile", 40, 20),
    Phase("mixers", 40, 20, default=False),
    Phase("frontier", 40, 20, default=False),
)


# --------------------------------------------------------------------------------------------- the session


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    if args.phase:  # a child: one phase in this process
        return _run_phase_here(args.phase, out, args.dry_run, args.deadline)
    if args.config:  # a grandchild: one training configuration in this process
        print(json.dumps(train_config(json.loads(args.config))), flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    return run_session(out, budget=args.budget, dry_run=args.dry_run, only=only)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/gpu_session", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("OUT", "gpu-session"), help="results folder (default $OUT)"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, CUDA-only checks skipped")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole session")
    p.add_argument("--only", default=None, help="comma-separated phases to run (default: all)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return p


def run_session(out: Path, *, budget: float, dry_run: bool, only: set[str] | None) -> int:
    """Every phase in order, each in a child process under its own time limit; returns 0 when none failed."""
    deadline = time.monotonic() + budget
    log = out / "session.log"
    statuses = {}
    for phase in PHASES:
        if (phase.name not in only) if only is not None else not phase.default:
            continue
        left = deadline - time.monotonic()
        if left < phase.min_s:
            result = {
                "status": "skipped",
                "reason": f"{left:.0f} s left of the session, the phase needs {phase.min_s:.0f}",
            }
            _write(out / f"{phase.name}.json", result)
        else:
            result = _run_phase_child(phase, out, dry_run, min(phase.budget_s, left), log)
        statuses[phase.name] = result["status"]
        _log(log, f"{phase.name}: {result['status']} {result.get('reason', '')}".rstrip())
    print(json.dumps(statuses), flush=True)
    return 1 if any(s in ("failed", "timeout") for s in statuses.values()) else 0


def _run_phase_child(
    phase: Phase, out: Path, dry_run: bool, limit: float, log: Path, grace: float = 5.0
) -> dict[str, Any]:
    """One phase in a fresh process: CUDA state, compile caches and peak-memory counters start clean. The child
    is told its deadline and keeps it; one that does not is killed `grace` seconds after it."""
    cmd = [sys.executable, str(Path(__file__)), "--phase", phase.name, "--out", str(out)]
    cmd += ["--deadline", str(time.time() + limit)] + (["--dry-run"] if dry_run else [])
    start = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"\n===== {phase.name} (limit {limit:.0f} s) =====\n")
        sink.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=limit + grace, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    path = out / f"{phase.name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    if rc is None:
        result.update(status="timeout", reason=f"stopped at its {limit:.0f} s limit; partial results kept")
    elif not result:
        result = {"status": "failed", "reason": f"exit status {rc} before writing results (session.log)"}
    result["seconds"] = round(time.monotonic() - start, 1)
    _write(path, result)
    return result


def _run_phase_here(name: str, out: Path, dry_run: bool, deadline: float | None) -> int:
    ctx = Context(out=out, dry_run=dry_run, deadline=deadline or time.time() + 3600)
    path = out / f"{name}.json"
    try:
        result = {"status": "ok", **PHASE_FUNCTIONS[name](ctx)}
    except Exception as err:  # a phase that breaks is a result, not the end of the session
        result = {"status": "failed", "reason": f"{type(err).__name__}: {err}".splitlines()[0], **ctx.partial}
    _write(path, result)
    return 0


@dataclass
class Context:
    """What a phase knows: where results go, whether this is the CPU dry run, and when it must be done by."""

    out: Path
    dry_run: bool
    deadline: float  # time.time() seconds
    partial: dict[str, Any] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.partial = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def save_partial(self, name: str, **values: Any) -> None:
        """Results so far: written at once, so a phase stopped at its limit still brings them back."""
        self.partial.update(values)
        _write(self.out / f"{name}.json", {"status": "timeout", **self.partial})


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def _log(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)


SCRATCH_KIND = "gpu-session"


def scratch() -> Path:
    """Runs, checkpoints and exports: outside $OUT (only results travel back), removed at the machine's end.
    The folder carries Loom's owner marker (framework/outputs.py); one that exists without it and is not empty is
    refused, so emptying its subfolders (_fresh) never deletes anything this script did not create."""
    path = Path(os.environ.get("LOOM_GPU_SCRATCH", Path(tempfile.gettempdir()) / "loom-gpu-session"))
    path.mkdir(parents=True, exist_ok=True)
    if owned_kind(path) != SCRATCH_KIND:
        if any(path.iterdir()):
            raise SystemExit(
                f"{path}: not a tools/gpu_session scratch folder (no marker); set LOOM_GPU_SCRATCH to a new one"
            )
        mark_owned(path, SCRATCH_KIND)
    return path


# ------------------------------------------------------------------------------------------------ phases


def phase_env(ctx: Context) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": ctx.dry_run,
        "command": SESSION_COMMAND,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30
        )
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        info["driver"] = _nvidia_smi("driver_version")
    info["libraries"] = {name: _library(name) for name in LIBRARIES}
    install = os.environ.get("LOOM_INSTALL_S")
    info["install_s"] = float(install) if install else None
    info["targets"] = {"install_under_60s": _target(info["install_s"], lambda s: s < INSTALL_TARGET_S,
                                                     "no carried wheels were installed (.whl/ absent)")}  # fmt: skip
    return info


def _nvidia_smi(field: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cmd = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    return None


def _library(name: str) -> str:
    """Its version, or 'absent: <why>'. Importing is the test: an installed package that fails to load is absent."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # ImportError, or a library that breaks while loading (a CUDA mismatch)
        return f"absent: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return str(getattr(module, "__version__", "present"))


def _target(value: Any, rule: Callable[[Any], bool], why_unknown: str) -> dict[str, Any]:
    """{value, met}: met is None (with the reason) when the value could not be measured here."""
    if value is None:
        return {"value": None, "met": None, "reason": why_unknown}
    return {"value": value, "met": bool(rule(value))}


def phase_smoke(ctx: Context) -> dict[str, Any]:
    from launcher.smoke import smoke

    overrides = DRY_SMOKE if ctx.dry_run else []
    report = smoke(None, overrides, str(_fresh(scratch() / "smoke")))
    checks = {c.name: {"ok": c.ok, "detail": c.detail} for c in report.checks}
    result = {"command": "loom smoke " + " ".join(f"--set {o}" for o in overrides), "checks": checks}
    result["measurements"] = report.measurements
    if report.failed:
        result.update(status="failed", reason="; ".join(f"{c.name}: {c.detail}" for c in report.failed))
    return result


DRY_SMOKE = ["train.steps=10", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=128",
             "train.global_batch_size=4", "train.micro_batch_size=4"]  # fmt: skip


def _fresh(path: Path) -> Path:
    """`path` (a subfolder of scratch(), whose marker says this script made it), emptied."""
    if path.exists():
        shutil.rmtree(path)
    return path


def phase_gpu_tests(ctx: Context) -> dict[str, Any]:
    files = gpu_test_files()
    report = scratch() / "gpu_tests.xml"
    per_test = 30 if ctx.dry_run else 120
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           "-o", f"timeout={per_test}", *map(str, files)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(10.0, ctx.left() - 5))
    cases = junit_cases(report) if report.exists() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    result = {"command": " ".join(cmd[2:]), "exit_status": proc.returncode, "counts": counts, "cases": cases}
    result["pytest_s"] = round(time.monotonic() - started, 1)
    result["tail"] = (proc.stdout + proc.stderr)[-2000:]
    if counts["failed"] or proc.returncode not in (0, 5):  # 5: no test collected
        result.update(
            status="failed", reason=f"{counts['failed']} gpu test(s) failed (exit {proc.returncode})"
        )
    return result


def gpu_test_files() -> list[Path]:
    """The test files that hold gpu-marked tests: found by their marker, so a new one is never left out."""
    marks = ("pytest.mark.gpu", "mark.gpu]")
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if any(m in p.read_text() for m in marks))


def junit_cases(path: Path) -> list[dict[str, str]]:
    """Each test case of a JUnit XML report: name, outcome and, for a skip or failure, its message."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "")[:300]
        cases.append(
            {"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message}
        )
    return cases


# -- training configurations (throughput, fp8, profile) ------------------------------------------------------


def base_config(ctx: Context) -> dict[str, Any]:
    """The recipe and overrides every measured configuration shares: one device, no checkpoints, no validation.
    A variant's own overrides follow the first `base_count`; results name a variant by those."""
    common = ["train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
              "logging.tensorboard=false", "logging.progress_bar=false", "launch.nnodes=1",
              "launch.nproc_per_node=1", "launch.gpus_per_node=0", "launch.gpu=null"]  # fmt: skip
    if ctx.dry_run:
        # 3 blocks: with fp8_skip_first_last the middle one is the block that runs float8
        tiny = ["train.device=cpu", "train.steps=6", "model.d_model=64", "model.n_layers=3", "model.n_heads=4",
                "model.kv_heads=2", "model.ffn_hidden=128", "data.validation=null", "precision.dtype=bf16"]  # fmt: skip
        overrides = common + tiny
        return {
            "recipe": "recipes/debug.yaml",
            "overrides": overrides,
            "base_count": len(overrides),
            "micro_batch": 4,
            "warmup": 2,
        }
    data = [f"data.train={LONG_DATA}", "data.validation=null", f"data.tokenizer={ROOT / 'data/demo/tokenizer.model'}",
            "train.steps=30", "precision.dtype=bf16"]  # fmt: skip
    overrides = common + data
    return {"recipe": "recipes/llama-1b.yaml", "overrides": overrides, "base_count": len(overrides), "micro_batch": None,
            "warmup": WARMUP_STEPS}  # fmt: skip


def variant(base: dict[str, Any], name: str, *overrides: str) -> dict[str, Any]:
    return {**base, "name": name, "overrides": [*base["overrides"], *overrides]}


def run_config(spec: dict[str, Any], ctx: Context, limit: float | None = None) -> dict[str, Any]:
    """One configuration in its own process (its own CUDA context, compile cache and peak-memory counter)."""
    limit = min(limit or ctx.left(), ctx.left()) - 2
    if limit < 10:
        return {"name": spec["name"], "status": "skipped", "reason": f"{limit:.0f} s left of the phase"}
    cmd = [sys.executable, str(Path(__file__)), "--config", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "status": "timeout", "reason": f"stopped at {limit:.0f} s"}
    sys.stdout.write(proc.stderr[-4000:])  # into session.log
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": spec["name"], "status": "failed", "reason": f"exit {proc.returncode}: {tail}"[:400]}
    return json.loads(lines[-1])


def train_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration here and measure it (the grandchild process of run_config)."""
    import torch

    from framework.config.loader import load_recipe
    from framework.run import train

    run_dir = _fresh(scratch() / "runs" / spec["name"])
    overrides = [*spec["overrides"], f"logging.run_dir={run_dir}"]
    recipe = load_recipe(ROOT / spec["recipe"], overrides)
    cuda = recipe.train.device != "cpu" and torch.cuda.is_available()
    micro = spec.get("micro_batch") or pick_micro_batch(recipe, cuda)
    recipe.train.micro_batch_size = recipe.train.global_batch_size = micro
    estimate = memory_estimate(recipe, "cuda" if cuda else "cpu")
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the run's own lines go to the log; stdout carries the JSON
        train(recipe)
    records = _train_records(run_dir)
    result = measure(records, spec.get("warmup", WARMUP_STEPS))
    result.update(name=spec["name"], status="ok", micro_batch=micro, seq_len=recipe.data.seq_len,
                  wall_s=round(time.monotonic() - started, 1), memory_estimate_gib=estimate / 2**30,
                  overrides=spec["overrides"][spec.get("base_count", 0):])  # fmt: skip
    result["peak_memory_gib"] = _peak_gib(cuda)
    result["memory_ratio"] = result["peak_memory_gib"] / result["memory_estimate_gib"] if cuda else None
    for name in ("trace", "top_kernels"):  # written by logging.profile_step (the profile phase)
        found = sorted((run_dir / "profile").glob(f"*.{name}.json"))
        if found:
            result[f"{name}_path"] = str(found[-1])
    return result


def pick_micro_batch(recipe: Any, cuda: bool) -> int:
    """The largest micro-batch of 4, 2, 1 the memory model fits in 85% of this GPU (1 on a CPU)."""
    import torch

    if not cuda:
        return 1
    capacity = torch.cuda.get_device_properties(0).total_memory * 0.85
    for micro in (4, 2):
        recipe.train.micro_batch_size = recipe.train.global_batch_size = micro
        if memory_estimate(recipe, "cuda") <= capacity:
            return micro
    return 1


def memory_estimate(recipe: Any, device: str) -> int:
    from framework.models.memory import memory_per_rank

    return memory_per_rank(recipe, device=device)["total"]


def _peak_gib(cuda: bool) -> float:
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def measure(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians of the per-GPU rates over the steps after `warmup`, and the loss of the first and last step."""
    steady = records[warmup:] or records

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": len(records), "tokens_per_s": median("tokens_per_s"), "tflops": median("tflops"),
            "mfu": median("mfu"), "step_time_s": median("step_time"), "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"]}  # fmt: skip


def phase_throughput(ctx: Context) -> dict[str, Any]:
    base = base_config(ctx)
    compile_on = (
        "parallel.compile=false" if ctx.dry_run else "parallel.compile=true"
    )  # inductor on 2 CPU cores: minutes
    configs = [  # the likely fastest first: a phase stopped early still has the number that matters
        variant(base, "compiled_ac_none", compile_on, "parallel.activation_checkpointing=none"),
        variant(base, "eager_ac_none", "parallel.compile=false", "parallel.activation_checkpointing=none"),
        variant(base, "compiled_ac_selective", compile_on, "parallel.activation_checkpointing=selective"),
    ]
    runs = []
    for spec in configs:
        runs.append(run_config(spec, ctx))
        ctx.save_partial("throughput", recipe=base["recipe"], runs=runs)
    done = [r for r in runs if r.get("status") == "ok"]
    best = max(done, key=lambda r: r["tokens_per_s"] or 0.0, default=None)
    result: dict[str, Any] = {"recipe": base["recipe"], "runs": runs, "best": best["name"] if best else None}
    if ctx.dry_run:
        result["compile_note"] = (
            "dry run: compile off in every configuration (inductor on 2 CPU cores takes minutes)"
        )
    result["targets"] = throughput_targets(best, ctx.dry_run)
    if not done:
        timed = all(r.get("status") == "skipped" for r in runs)
        result.update(status="skipped" if timed else "failed", reason="no configuration trained")
    return result


def throughput_targets(best: dict[str, Any] | None, dry_run: bool) -> dict[str, Any]:
    cpu = "dry run on CPU: no GPU peak and no CUDA memory counter"
    mfu = None if dry_run or best is None else best.get("mfu")
    ratio = None if dry_run or best is None else best.get("memory_ratio")
    return {
        "mfu_at_least_50pct": _target(mfu, lambda m: m >= MFU_TARGET, cpu if dry_run else "no MFU measured"),
        "memory_estimate_within_10pct": _target(
            ratio, lambda r: abs(r - 1.0) <= MEMORY_TOLERANCE, cpu if dry_run else "no peak memory measured"
        ),
    }


def phase_fp8(ctx: Context) -> dict[str, Any]:
    base = base_config(ctx)
    compile_on = "parallel.compile=false" if ctx.dry_run else "parallel.compile=true"
    torchao = _library("torchao")
    runs = [run_config(variant(base, "bf16", compile_on), ctx, ctx.left() / 3)]
    ctx.save_partial("fp8", runs=runs)
    skipped = {}
    recipes = [("torchao", r) for r in ("tensorwise", "rowwise")] + [("te", "delayed")]
    for backend, name in recipes:
        why = _fp8_unavailable(backend, torchao, ctx.dry_run)
        if why:
            skipped[f"{backend}_{name}"] = why
            continue
        fp8 = (
            compile_on,
            "precision.dtype=fp8",
            f"precision.fp8_backend={backend}",
            f"precision.fp8_recipe={name}",
        )
        runs.append(run_config(variant(base, f"{backend}_{name}", *fp8), ctx, ctx.left() / 2))
        ctx.save_partial("fp8", runs=runs, skipped=skipped)
    comparisons = fp8_comparisons(runs)
    result = {"runs": runs, "skipped": skipped, "comparisons": comparisons, "torchao": torchao}
    best = max(comparisons.values(), key=lambda c: c["speedup"] or 0.0, default=None)
    why = "dry run: emulated float8 on CPU is no speed measure" if ctx.dry_run else "no fp8 run finished"
    speedup = None if ctx.dry_run or best is None else best["speedup"]
    loss = None if ctx.dry_run or best is None else best["loss_rel"]
    result["targets"] = {"speedup_at_least_1.3x": _target(speedup, lambda s: s >= FP8_SPEEDUP_TARGET, why),
                         "loss_within_1pct": _target(loss, lambda x: x <= FP8_LOSS_TOLERANCE, why)}  # fmt: skip
    return result


def _fp8_unavailable(backend: str, torchao: str, dry_run: bool) -> str | None:
    if backend == "torchao":
        return f"torchao {torchao}" if torchao.startswith("absent") else None
    if dry_run:
        return "Transformer Engine runs on CUDA only"
    te = _library("transformer_engine")
    return f"transformer_engine {te}" if te.startswith("absent") else None


def fp8_comparisons(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each fp8 run against the bf16 run: tokens/s ratio and the relative difference of the last loss."""
    base = next((r for r in runs if r["name"] == "bf16" and r.get("status") == "ok"), None)
    out = {}
    for run in runs:
        if run["name"] == "bf16" or run.get("status") != "ok" or base is None:
            continue
        speedup = run["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
        loss_rel = abs(run["loss_last"] - base["loss_last"]) / abs(base["loss_last"])
        out[run["name"]] = {"speedup": speedup, "loss_rel": loss_rel}
    return out


def phase_profile(ctx: Context) -> dict[str, Any]:
    """One steady step of the fastest throughput configuration (the third step in a dry run)."""
    throughput = ctx.out / "throughput.json"
    runs = json.loads(throughput.read_text()).get("runs", []) if throughput.exists() else []
    done = [r for r in runs if r.get("status") == "ok"]
    best = max(done, key=lambda r: r["tokens_per_s"] or 0.0, default=None)
    base = base_config(ctx)
    chosen = best["overrides"] if best else []
    step = 3 if ctx.dry_run else 6  # past compilation and autotuning
    spec = variant(base, "profile", *chosen, f"train.steps={step}", f"logging.profile_step={step}")
    if best:
        spec["micro_batch"] = best["micro_batch"]
    run = run_config(spec, ctx)
    result = {"configuration": best["name"] if best else "the base configuration", "step": step, "run": run}
    if run.get("status") != "ok" or "trace_path" not in run:
        return {**result, "status": "failed", "reason": run.get("reason", "no trace written")}
    with open(run["trace_path"], "rb") as src, gzip.open(ctx.out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    result["top_kernels"] = json.loads(Path(run["top_kernels_path"]).read_text())
    result["trace"] = "trace.json.gz"
    return result


# benchmarks/mixers.py: on CUDA the scaling (2k -> 8k) and kernel comparisons at real sizes (seconds on an H200; 512
# dropped to keep the phase short); the dry run is its --quick CPU smoke run.
MIXERS_ARGS = ["--device", "cuda", "--seqs", "2048,8192", "--repeats", "5"]
DRY_MIXERS_ARGS = ["--quick", "--threads", "1", "--clock", "cpu"]


# benchmarks/frontier.py: MLA and MTP at the CPU benchmark's sizes, on CUDA in bf16 (seconds on an H200).
FRONTIER_ARGS = ["--device", "cuda", "--seq", "4096", "--repeats", "10"]
DRY_FRONTIER_ARGS = ["--quick", "--threads", "1", "--clock", "cpu"]


def phase_mixers(ctx: Context) -> dict[str, Any]:
    """benchmarks/mixers.py in a child process; its output lines (tables, PASS/FAIL) are the result."""
    return _benchmark(ctx, "mixers.py", DRY_MIXERS_ARGS if ctx.dry_run else MIXERS_ARGS)


def phase_frontier(ctx: Context) -> dict[str, Any]:
    """benchmarks/frontier.py in a child process, reported as phase_mixers is."""
    return _benchmark(ctx, "frontier.py", DRY_FRONTIER_ARGS if ctx.dry_run else FRONTIER_ARGS)


def _benchmark(ctx: Context, script: str, args: list[str]) -> dict[str, Any]:
    """One benchmarks/ script with `args`, stopped at the phase's limit: its printed lines and PASS/FAIL verdicts."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result: dict[str, Any] = {"command": f"python benchmarks/{script} " + " ".join(args)}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(5.0, ctx.left() - 3)
        )
    except subprocess.TimeoutExpired as err:  # keep the lines printed so far
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {
            **result,
            "status": "timeout",
            "reason": "stopped at the phase's limit",
            "output": out.splitlines(),
        }
    result.update(exit_status=proc.returncode, output=proc.stdout.splitlines(), tail=proc.stderr[-2000:])
    result["verdicts"] = [line for line in result["output"] if line.endswith(("PASS", "FAIL"))]
    if proc.returncode != 0:
        result.update(status="failed", reason=f"exit status {proc.returncode} (tail)")
    return result


PHASE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "env": phase_env,
    "smoke": phase_smoke,
    "gpu_tests": phase_gpu_tests,
    "throughput": phase_throughput,
    "fp8": phase_fp8,
    "profile": phase_profile,
    "mixers": phase_mixers,
    "frontier": phase_frontier,
}


if __name__ == "__main__":
    raise SystemExit(main())
