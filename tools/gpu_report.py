"""Render a GPU session's results (tools/gpu_session's $OUT: one JSON per phase) as Markdown.

    python tools/gpu_report.py DIR                         # print the report
    python tools/gpu_report.py DIR --update docs/benchmarks.md   # replace the file's GPU-session section

The section lies between the markers below; the file is rewritten atomically (a temporary sibling, then a rename).
Every GPU speed figure in the README comes from this section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- gpu-session:begin -->", "<!-- gpu-session:end -->"
PHASES = ("env", "smoke", "gpu_tests", "throughput", "fp8", "profile")
OPTIONAL = (
    "mixers",
    "frontier",
)  # phases run only when `--only` names them: reported when their JSON is there


def load(folder: Path) -> dict[str, dict[str, Any]]:
    """Each phase's JSON; a phase without one is reported as missing."""
    out = {}
    for name in PHASES:
        path = folder / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else {"status": "missing"}
    for name in OPTIONAL:
        path = folder / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def render(results: dict[str, dict[str, Any]]) -> str:
    parts = [
        _header(results["env"]),
        _phases(results),
        _smoke(results["smoke"]),
        _tests(results["gpu_tests"]),
    ]
    parts += [_throughput(results["throughput"]), _fp8(results["fp8"]), _profile(results["profile"])]
    parts.append(_benchmark("Sequence mixers", results.get("mixers", {})))
    parts.append(_benchmark("Frontier blocks", results.get("frontier", {})))
    return "\n\n".join(p for p in parts if p) + "\n"


def _num(value: Any, fmt: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _header(env: dict[str, Any]) -> str:
    kind = "dry run on CPU (no GPU figures)" if env.get("dry_run") else env.get("gpu", "no GPU seen")
    title = f"### GPU session {env.get('date', '(date unknown)')}: {kind}"
    lines = []
    lines.append(
        f"Command (device tool, after `tools/gpu_prepare`): `{env.get('command', 'tools/gpu_session')}`"
    )
    versions = [f"{k} {env[k]}" for k in ("driver", "cuda", "torch", "nccl", "python") if env.get(k)]
    lines.append(
        f"Machine: {', '.join(versions)}"
        + (f"; {env['memory_gib']:.1f} GiB" if env.get("memory_gib") else "")
    )
    libs = env.get("libraries", {})
    present = [f"{k} {v}" for k, v in libs.items() if not str(v).startswith("absent")]
    absent = [k for k, v in libs.items() if str(v).startswith("absent")]
    lines.append(f"Libraries: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}")
    if env.get("install_s") is not None:
        lines.append(f"Carried wheels installed in {env['install_s']:.1f} s (target < 60 s)")
    return title + "\n\n" + "  \n".join(lines)


def _phases(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| phase | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        note = str(r.get("reason", "")).replace("|", "/")
        rows.append(f"| {name} | {r.get('status')} | {_num(r.get('seconds'), '.0f')} | {note} |")
    return "\n".join(rows)


def _smoke(smoke: dict[str, Any]) -> str:
    if "checks" not in smoke:
        return ""
    rows = [f"`{smoke.get('command', 'loom smoke')}`", "", "| check | result |", "| --- | --- |"]
    rows += [f"| {n} | {'ok' if c['ok'] else 'FAIL'}: {c['detail']} |" for n, c in smoke["checks"].items()]
    rows += [f"| {n} | {v} |" for n, v in smoke.get("measurements", {}).items()]
    return "\n".join(rows)


def _tests(tests: dict[str, Any]) -> str:
    if "counts" not in tests:
        return ""
    c = tests["counts"]
    failed = [f"`{t['name']}`: {t['message']}" for t in tests.get("cases", []) if t["outcome"] == "failed"]
    line = f"`pytest -m gpu`: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    return "\n".join([line, *(f"- {f}" for f in failed)])


def _throughput(tp: dict[str, Any]) -> str:
    if "runs" not in tp:
        return ""
    rows = [f"Throughput, `{tp.get('recipe')}` (per GPU; medians after the first steps):", "",
            "| configuration | micro-batch x seq | tokens/s | TFLOP/s | MFU | peak memory GiB | estimate GiB | loss first -> last |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in tp["runs"]:
        if r.get("status") != "ok":
            rows.append(f"| {r['name']} | {r.get('status')}: {r.get('reason', '')} | | | | | | |")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        rows.append(f"| {r['name']} | {r['micro_batch']} x {r['seq_len']} | {_num(r['tokens_per_s'])} | "
                    f"{_num(r['tflops'], '.1f')} | {mfu} | {_num(r['peak_memory_gib'], '.1f')} | "
                    f"{_num(r['memory_estimate_gib'], '.1f')} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")  # fmt: skip
    return "\n".join(rows + ["", _targets(tp.get("targets", {}))])


def _targets(targets: dict[str, Any]) -> str:
    parts = []
    for name, t in targets.items():
        if t["met"] is None:
            parts.append(f"{name}: not measured ({t.get('reason')})")
        else:
            value = t["value"]
            parts.append(f"{name}: {'met' if t['met'] else 'NOT met'} ({value:.3g})")
    return "Targets: " + "; ".join(parts) if parts else ""


def _fp8(fp8: dict[str, Any]) -> str:
    if "runs" not in fp8:
        return ""
    rows = ["FP8 against bf16 (same recipe, 30 steps):", "", "| run | tokens/s | x bf16 | last loss | loss rel diff |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    comps = fp8.get("comparisons", {})
    for r in fp8["runs"]:
        if r.get("status") != "ok":
            rows.append(f"| {r['name']} | {r.get('status')}: {r.get('reason', '')} | | | |")
            continue
        c = comps.get(r["name"], {})
        rows.append(f"| {r['name']} | {_num(r['tokens_per_s'])} | {_num(c.get('speedup'), '.2f')} | "
                    f"{r['loss_last']:.4f} | {_num(c.get('loss_rel'), '.2e')} |")  # fmt: skip
    rows += [f"| {name} | skipped: {why} | | | |" for name, why in fp8.get("skipped", {}).items()]
    return "\n".join(rows + ["", _targets(fp8.get("targets", {}))])


def _profile(profile: dict[str, Any]) -> str:
    if "top_kernels" not in profile:
        return ""
    rows = [f"Top kernels of step {profile['step']} of `{profile['configuration']}` (trace: `trace.json.gz`):", "",
            "| kernel / op | ms | calls |", "| --- | --- | --- |"]  # fmt: skip
    rows += [f"| `{k['name'][:90]}` | {k['ms']:.2f} | {k['calls']} |" for k in profile["top_kernels"]]
    return "\n".join(rows)


def _benchmark(title: str, phase: dict[str, Any]) -> str:
    """An opt-in benchmark phase's printed lines, under its command (nothing when it did not run)."""
    if not phase.get("output"):
        return ""
    return "\n".join([f"{title} (`{phase['command']}`):", "", "```", *phase["output"], "```"])


def update(doc: Path, section: str) -> None:
    """Replace what lies between BEGIN and END in `doc` with `section` (atomically)."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")
    tmp.replace(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--update", type=Path, default=None, help="a Markdown file with the section markers")
    args = parser.parse_args(argv)
    section = render(load(args.folder))
    if args.update is None:
        sys.stdout.write(section)
    else:
        update(args.update, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
