"""benchmarks/mixers.py --quick runs on the CPU (a few seconds) and its printed figures agree with each other:
us per token is ms / seq, the ratio column is time / attention's time, each PASS/FAIL follows its printed ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (attention|gdn|mamba2) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", re.M)
SCALING = re.compile(
    r"^(gdn|mamba2): time\((\d+)\) / time\((\d+)\) = ([\d.]+), target <= ([\d.]+): (PASS|FAIL)$", re.M
)
OPS = re.compile(
    r"^(gdn|mamba2): chunked ([\d.]+) ms, naive ([\d.]+) ms, speedup ([\d.]+)x, target >= 20x: (PASS|FAIL)$",
    re.M,
)


def _quotient(
    q: float, num: float, den: float, den_half: float = 0.005, scale: float = 1.0, q_half: float = 0.005
):
    """q = scale * num / den up to the printed roundings: num to 2 decimals, den to +-den_half, q to +-q_half."""
    lo = (num - 0.005) / (den + den_half) * scale - q_half
    hi = (num + 0.005) / (den - den_half) * scale + q_half
    return lo <= q <= hi


def test_quick_run_prints_consistent_figures() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "mixers.py"),
        "--quick",
        "--threads",
        "1",
        "--clock",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(m, int(s)): tuple(map(float, v)) for m, s, *v in ROW.findall(proc.stdout)}
    assert set(rows) == {(m, s) for m in ("attention", "gdn", "mamba2") for s in (64, 256)}
    for (mixer, seq), (ms, us_per_token, ratio) in rows.items():
        assert ms > 0 and _quotient(us_per_token, ms, seq, den_half=0.0, scale=1e3), (mixer, seq)
        assert _quotient(ratio, ms, rows["attention", seq][0]), (mixer, seq)
    scaling = SCALING.findall(proc.stdout)
    assert [s[0] for s in scaling] == ["gdn", "mamba2"]
    for _, long, short, ratio, target, verdict in scaling:
        assert (long, short, float(target)) == ("256", "64", 4.6)
        assert (verdict == "PASS") == (float(ratio) <= 4.6)
    ops = OPS.findall(proc.stdout)
    assert [o[0] for o in ops] == ["gdn", "mamba2"]
    for _, chunked, naive, speedup, verdict in ops:
        assert float(chunked) > 0 and _quotient(float(speedup), float(naive), float(chunked), q_half=0.05)
        assert (verdict == "PASS") == (float(speedup) >= 20)
