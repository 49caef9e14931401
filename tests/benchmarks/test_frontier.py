"""benchmarks/frontier.py --quick runs on the CPU (seconds) and its printed figures agree with each other: the MLA
and GQA rows give the printed ratios, the GQA baseline's FLOPs are within 25% of MLA's (the closest even head_dim),
and the MTP verdict follows its printed ratio and target (1.10 x the FLOP ratio)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (mla|gqa) \| ([\d.]+) \| ([\d.]+) \|$", re.M)
RATIO = re.compile(r"^mla / gqa: time ([\d.]+), FLOPs ([\d.]+), time per FLOP ([\d.]+)$", re.M)
MTP = re.compile(r"^mtp: time ratio ([\d.]+), FLOP ratio ([\d.]+), target <= ([\d.]+): (PASS|FAIL)$", re.M)


def test_quick_run_prints_consistent_figures() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--quick", "--threads", "1"]
    proc = subprocess.run(cmd + ["--clock", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {name: (float(f), float(t)) for name, f, t in ROW.findall(proc.stdout)}
    assert set(rows) == {"mla", "gqa"}
    ((time_ratio, flop_ratio, per_flop),) = [tuple(map(float, r)) for r in RATIO.findall(proc.stdout)]
    assert abs(flop_ratio - rows["mla"][0] / rows["gqa"][0]) <= 0.02 + 0.0005 / rows["gqa"][0]
    assert 0.75 <= flop_ratio <= 1.25
    assert rows["mla"][1] > 0 and rows["gqa"][1] > 0
    assert abs(time_ratio - rows["mla"][1] / rows["gqa"][1]) <= 0.01 * time_ratio + 0.01
    assert abs(per_flop - time_ratio / flop_ratio) <= 0.01 * per_flop + 0.01
    ((ratio, flops, target, verdict),) = MTP.findall(proc.stdout)
    assert float(flops) > 1.0 and abs(float(target) - 1.10 * float(flops)) <= 0.002
    assert (verdict == "PASS") == (float(ratio) <= float(target))
