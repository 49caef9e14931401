"""`loom smoke [RECIPE]`: is this machine (one GPU, or the CPU) healthy and how fast does it train?

Trains the recipe for its `train.steps` in a temporary run directory, in this process, on one device, and checks:

  loss falls        the mean loss of the last 5 steps is at least 1% below that of the first 5
  resume            the checkpoint saved half-way, resumed in a fresh run, gives the uninterrupted run's next loss
                    (bitwise on CPU; within 1e-5 relative on CUDA, where kernels may choose other algorithms)
  hf export         the final checkpoint exported (`loom convert --to hf`) loads in transformers, and its logits
                    match Loom's for the same weights
  attention kernel  which SDPA kernel the model's attention dispatched to (profiler op and kernel names); on
                    CUDA the math fallback fails the check: it is the slow path the fused kernels exist to avoid

and reports tokens/s, TFLOP/s and MFU (from metrics.jsonl, past the first steps), and peak memory (CUDA: max
allocated; CPU: the process's max RSS, which includes everything this process loaded). Exit status 0 when every
check passes, 1 otherwise, with one line per failed check on stderr.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from framework.config import Recipe
from framework.config.errors import ConfigError
from framework.config.loader import load_recipe
from framework.outputs import move_aside

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "smoke.yaml"
EXIT_CHECK_FAILED = 1
MIN_STEPS = 10  # 5 first, 5 last, and a checkpoint half-way
LOSS_DROP = 0.01
CUDA_RESUME_TOLERANCE = 1e-5
HF_TOLERANCE = 1e-3
WARMUP_STEPS = 2  # first steps excluded from throughput: allocator warm-up, cuDNN/cuBLAS autotuning
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_attention_math": "math",
}
FUSED_KERNEL_WORDS = ("flash", "fmha", "cudnn", "efficient", "fused_attn")
"""Words in the CUDA kernel names of fused attention: SDPA's flash / memory-efficient / cuDNN kernels, TE's."""
TRITON_PREFIX = "triton_"
"""Compiled FlexAttention runs as inductor-generated Triton kernels (triton_tem_fused_*); the smoke model is not
compiled otherwise, so with a flex op in the trace these are the attention kernels."""


def fused_kernels(gpu_kernels: set[str], ops: list[str]) -> list[str]:
    """The fused attention kernels among the CUDA kernel names of a trace whose attention ops are `ops`."""
    flex = any("flex_attention" in op for op in ops)
    return sorted(
        n
        for n in gpu_kernels
        if any(w in n.lower() for w in FUSED_KERNEL_WORDS) or (flex and n.startswith(TRITON_PREFIX))
    )


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class SmokeReport:
    """The checks and the measurements of one smoke run."""

    checks: list[Check] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def table(self) -> str:
        width = max(len(n) for n in [*(c.name for c in self.checks), *self.measurements])
        lines = [f"{c.name:<{width}}  {'ok' if c.ok else 'FAIL':<4}  {c.detail}" for c in self.checks]
        lines += [f"{name:<{width}}  {'':<4}  {value}" for name, value in self.measurements.items()]
        return "\n".join(lines)


def smoke(recipe_path: str | None, overrides: list[str], run_dir: str | None = None) -> SmokeReport:
    """Run every check of `recipe_path` (default recipes/smoke.yaml) with `overrides`; a recipe mistake is a
    ConfigError, a failed check an entry of the report. run_dir: keep the runs there (default: a temp dir)."""
    path = str(recipe_path or DEFAULT_RECIPE)
    if recipe_path is None:
        _ensure_demo_data()
    if run_dir is not None:
        return _smoke(path, overrides, Path(run_dir))
    with tempfile.TemporaryDirectory(prefix="loom-smoke-") as tmp:
        return _smoke(path, overrides, Path(tmp))


def _ensure_demo_data() -> None:
    """The default recipe trains on the bundled demo corpus: build it on first use (a no-op when present)."""
    from framework.data import build_demo_data

    build_demo_data(ROOT / "data" / "demo")


def _smoke(path: str, overrides: list[str], root: Path) -> SmokeReport:
    recipe = smoke_recipe(load_recipe(path, overrides), root / "run")
    device = _device(recipe)
    note = cpu_precision(recipe, device, overrides)
    if note:
        print(note, flush=True)  # before the run: the user sees at once why it is not bf16
    report = SmokeReport()
    records = _guarded(report, "train", lambda: _train_full(recipe, device))
    if records is None:
        return report
    report.checks.append(check_loss_falls([r["loss"] for r in records]))
    _guarded(report, "resume", lambda: report.checks.append(_check_resume(recipe, records, root, device)))
    _guarded(report, "hf export", lambda: report.checks.append(_check_export(recipe, root)))
    _guarded(report, "attention kernel", lambda: report.checks.append(_check_attention(recipe, device)))
    report.measurements.update(_throughput(records))
    report.measurements["peak memory"] = _peak_memory(device)
    report.measurements["device"] = _device_name(device)
    return report


def _guarded(report: SmokeReport, name: str, step: Callable[[], Any]) -> Any:
    """Run one stage; an exception fails the check `name` with its message (one line) instead of the command."""
    try:
        return step()
    except ConfigError:
        raise
    except Exception as err:  # a smoke test reports what broke, and goes on to the next check
        report.checks.append(Check(name, False, " ".join(f"{type(err).__name__}: {err}".split())[:300]))
        return None


def smoke_recipe(recipe: Recipe, run_dir: Path) -> Recipe:
    """The recipe as the smoke run needs it: its own run directory, a checkpoint half-way and at the end, every
    step logged, no progress bar or TensorBoard. Fewer than MIN_STEPS steps is a ConfigError."""
    steps = recipe.train.steps
    if steps < MIN_STEPS:
        raise ConfigError(
            None, "train.steps", steps, f"loom smoke needs at least {MIN_STEPS} steps (first 5, last 5, resume)",
            "--set train.steps=30",
        )  # fmt: skip
    recipe.logging.run_dir = str(run_dir)
    recipe.logging.log_every, recipe.logging.progress_bar, recipe.logging.tensorboard = 1, False, False
    recipe.logging.jsonl = True
    recipe.checkpoint.dir, recipe.checkpoint.every = None, steps // 2
    recipe.checkpoint.save_final, recipe.checkpoint.keep_last = True, 2
    recipe.checkpoint.keep_every = 0
    recipe.validate()
    return recipe


def cpu_precision(recipe: Recipe, device: torch.device, overrides: list[str]) -> str | None:
    """On a CPU, bf16/fp16 autocast (the recipe's GPU setting) becomes fp32, about 10x faster there
    (docs/benchmarks.md), unless `--set precision.dtype=...` asked for it; returns the line saying so, or None."""
    chosen = any(o.split("=", 1)[0].strip() in ("precision", "precision.dtype") for o in overrides)
    if device.type != "cpu" or chosen or recipe.precision.dtype not in ("bf16", "fp16"):
        return None
    was, recipe.precision.dtype = recipe.precision.dtype, "fp32"
    return (
        f"loom smoke: training in fp32 on the CPU ({was} autocast without {was} units is about 10x slower); "
        f"--set precision.dtype={was} forces {was}"
    )


def _device(recipe: Recipe) -> torch.device:
    from framework.train import resolve_device

    return resolve_device(recipe.train.device)


def _train_full(recipe: Recipe, device: torch.device) -> list[dict[str, Any]]:
    from framework.run import train

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _quiet():  # a reused --run-dir: the earlier smoke run is moved aside whole (overwrite), not mixed in
        train(recipe, overwrite=True)
    return _train_records(Path(recipe.logging.run_dir))


def _quiet() -> contextlib.AbstractContextManager:
    """The smoke report is the table: each run's end-of-run summary (stdout) stays in its metrics.jsonl."""
    return contextlib.redirect_stdout(io.StringIO())


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def check_loss_falls(losses: list[float]) -> Check:
    """Mean of the last 5 losses at least LOSS_DROP (relative) below the mean of the first 5."""
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    detail = f"first-5 mean {first:.4f} -> last-5 mean {last:.4f}"
    if not (math.isfinite(last) and last <= first * (1 - LOSS_DROP)):
        return Check("loss falls", False, f"loss did not fall: {detail} (needs >= {LOSS_DROP:.0%} lower)")
    return Check("loss falls", True, detail)


def _check_resume(recipe: Recipe, records: list[dict[str, Any]], root: Path, device: torch.device) -> Check:
    """Resume the half-way checkpoint in a fresh run directory for one step; its loss must be the full run's
    (the loss of step N+1 is computed before that step's update, so the shorter run's schedule does not enter)."""
    from framework.run import train

    step = recipe.checkpoint.every
    saved = Path(recipe.logging.run_dir) / "checkpoints" / f"step_{step:08d}"
    resumed = copy.deepcopy(recipe)
    resumed.logging.run_dir, resumed.train.steps = str(root / "resume"), step + 1
    resumed.checkpoint.every, resumed.checkpoint.save_final = 0, False
    if Path(
        resumed.logging.run_dir
    ).exists():  # an earlier smoke's resume run: kept aside, never read as ours
        move_aside(Path(resumed.logging.run_dir))
    with _quiet():
        train(resumed, resume=str(saved))
    want = next(r["loss"] for r in records if r["step"] == step + 1)
    got = next(r["loss"] for r in _train_records(root / "resume") if r["step"] == step + 1)
    diff = abs(got - want) / max(abs(want), 1e-12)
    tolerance = CUDA_RESUME_TOLERANCE if device.type == "cuda" else 0.0
    detail = f"saved at step {step}: step {step + 1} loss {got:.6f}, unbroken run {want:.6f} (rel {diff:.0e})"
    ok = diff <= tolerance
    return Check("resume", ok, detail if ok else f"resumed loss differs: {detail}")


AUTO_CLASSES = {
    "decoder": "AutoModelForCausalLM",
    "encoder": "AutoModelForMaskedLM",
    "encoder_decoder": "AutoModelForSeq2SeqLM",
}


def _check_export(recipe: Recipe, root: Path) -> Check:
    """Export the final checkpoint to HF, load it with transformers, compare one forward with Loom's."""
    try:
        import transformers
    except ImportError:
        return Check("hf export", False, "transformers is not installed: pip install 'loom-pretrain[hf]'")
    from framework.convert.consolidate import read_model_state
    from framework.convert.hf.convert import export_checkpoint
    from framework.run import materialize_model

    checkpoints = Path(recipe.logging.run_dir) / "checkpoints"
    out = export_checkpoint(checkpoints, root / "hf", overwrite=True)  # smoke's own scratch folder
    auto = AUTO_CLASSES[recipe.model.family]
    hf = getattr(transformers, auto).from_pretrained(str(out), dtype=torch.float32).eval()
    loom = materialize_model(recipe.model, torch.device("cpu"), recipe.train.seed).eval()
    loom.load_state_dict(read_model_state(checkpoints).tensors)
    batch = _probe_batch(recipe, batch=2, length=min(16, recipe.data.seq_len))
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = loom(batch.pop("input_ids"), **batch)
    diff = (theirs - ours).abs().max().item() / max(ours.abs().max().item(), 1.0)
    detail = f"{auto} ({type(hf).__name__}) loaded {out.name}/; logits max rel diff {diff:.1e} vs Loom"
    return Check("hf export", diff <= HF_TOLERANCE, detail)


def _probe_batch(recipe: Recipe, batch: int, length: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = recipe.model.vocab_size
    out = {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}
    if recipe.model.family == "encoder_decoder":
        out["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(1, length // 2)), generator=gen)
    return {k: v.to(device) for k, v in out.items()}


def _check_attention(recipe: Recipe, device: torch.device) -> Check:
    """Profile one forward + backward of the recipe's model on `device` and name the attention kernels."""
    ops, kernels = _profile_attention(recipe, device)
    return attention_check(device.type, ops, kernels, recipe.model.attention_backend)


def _profile_attention(recipe: Recipe, device: torch.device) -> tuple[list[str], list[str]]:
    """(SDPA-level op names, CUDA kernel names) seen in one forward + backward."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from framework.kernels.choice import resolve_kernels, use_kernels
    from framework.run import materialize_model
    from framework.train.precision import Precision

    model = materialize_model(recipe.model, device, recipe.train.seed)
    model = use_kernels(model, resolve_kernels(recipe, device))
    batch = _probe_batch(recipe, recipe.train.micro_batch_size, recipe.data.seq_len, str(device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with Precision(recipe.precision, device).autocast():
            logits = model(batch.pop("input_ids"), **batch)
        logits.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    names = {e.name for e in prof.events()}
    on_gpu = {e.name for e in prof.events() if e.device_type == DeviceType.CUDA}
    ops = sorted(n for n in names if n in SDPA_OPS or "flex_attention" in n)
    return ops, fused_kernels(on_gpu, ops)


def attention_check(device_type: str, ops: list[str], kernels: list[str], backend: str) -> Check:
    """Name the attention path from profiler names; the math fallback (or no fused kernel) on CUDA fails."""
    kinds = sorted({SDPA_OPS.get(op, "flex") for op in ops})
    if not kinds:
        kinds = ["te fused" if any("fused_attn" in k for k in kernels) else f"{backend} (no SDPA op)"]
    where = f"{device_type} sdpa" if ops else device_type
    detail = f"{where}: {', '.join(kinds)}" + (f"; kernels {', '.join(kernels[:2])}" if kernels else "")
    slow = device_type == "cuda" and (not kernels or "math" in kinds)
    return Check("attention kernel", not slow, f"math fallback on CUDA: {detail}" if slow else detail)


def _throughput(records: list[dict[str, Any]]) -> dict[str, str]:
    """Medians over the steps after WARMUP_STEPS (the median ignores the checkpoint step's hiccups)."""
    steady = records[WARMUP_STEPS:] or records

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    tokens, tflops, mfu = median("tokens_per_s"), median("tflops"), median("mfu")
    no_peak = "n/a (no peak known for this device; set logging.peak_tflops)"
    return {
        "tokens/s": f"{tokens:,.0f}" if tokens is not None else "n/a",
        "TFLOP/s": f"{tflops:.4g}" if tflops is not None else "n/a",
        "MFU": f"{mfu:.1%}" if mfu is not None else no_peak,
    }


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated (torch.cuda)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return f"{rss_kib / 2**20:.2f} GiB max RSS of this process (CPU)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_smoke(recipe_path: str | None, overrides: list[str], run_dir: str | None) -> int:
    """`loom smoke`: print the table; exit 0 when every check passed, else 1 with one stderr line per failure."""
    report = smoke(recipe_path, overrides, run_dir)
    print(report.table())
    for check in report.failed:
        print(f"loom smoke: FAILED {check.name}: {check.detail}", file=sys.stderr)
    return EXIT_CHECK_FAILED if report.failed else 0
