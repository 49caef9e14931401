"""benchmarks/context_parallel.py runs on the CPU at a short sequence and its printed figures agree with each
other: each layout's ratio is its step time over one process's, and the exposed fraction is the time waited over
the transfers' time alone (at 1024 tokens a block is too short to hide a transfer: no target is asserted here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s*(\d+)\s+(one process|\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", re.M)
EXPOSED = re.compile(
    r"transfers alone ([\d.]+) ms, waited in forward \+ backward ([\d.]+) ms: exposed ([\d.]+)%"
)


def test_short_run_prints_consistent_figures() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "context_parallel.py"), "--seqs", "1024", "--layouts"]
    cmd += ["ring_cp2", "--steps", "1", "--warmup", "0", "--layers", "1", "--d-model", "64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {name: (float(step), float(ratio)) for _, name, _, step, ratio in ROW.findall(proc.stdout)}
    assert set(rows) == {"one process", "ring_cp2"}, proc.stdout
    base = rows["one process"][0]
    assert abs(rows["ring_cp2"][1] - rows["ring_cp2"][0] / base) <= 0.01 + 0.001 / base
    ((alone, waited, exposed),) = [tuple(map(float, m)) for m in EXPOSED.findall(proc.stdout)]
    # both times are printed to 0.1 ms, the fraction to 0.1%
    assert alone > 0 and abs(exposed - 100 * waited / alone) <= 0.1 + 100 * 0.05 * (1 + exposed / 100) / alone
