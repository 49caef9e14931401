"""The run path needs only what a bare GPU node has (issue 20: the lent GPU machine has torch, numpy,
sentencepiece, safetensors, tqdm, tensorboard, pyyaml and transformers, but no webdataset, zstandard, braceexpand,
matplotlib or wandb, and no internet). A fresh interpreter with those imports made to fail trains the debug model on
the prepared demo shards, saves and resumes a checkpoint, and imports every CLI module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABSENT = ("webdataset", "zstandard", "braceexpand", "matplotlib", "wandb")

SCRIPT = """
import sys
for name in {absent!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as where it is not installed
from launcher.cli import main
import launcher.smoke, launcher.check, launcher.plot, framework.convert.hf, framework.convert.consolidate
args = ["train", "recipes/debug.yaml", "--set", "train.steps=2", "--set", "model.n_layers=1",
        "--set", "data.seq_len=32", "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=2",
        "--set", "logging.run_dir={run}", "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
        "--set", "train.eval_every=0"]
assert main(args) == 0
assert main([*args, "--set", "train.steps=3", "--resume", "auto"]) == 0
leaked = [name for name in {absent!r} if sys.modules.get(name) is not None]
assert not leaked, leaked
"""


def test_training_needs_no_optional_library(demo_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = SCRIPT.format(absent=ABSENT, run=run)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps
