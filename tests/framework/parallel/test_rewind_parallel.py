"""Loss-spike rewind on FSDP2 x 2 (train.spike_policy: rewind): both ranks see the same spike (the loss is
all-reduced), go back to the same checkpoint together (a collective load), skip the same global range, and end
bit for bit where a run whose data omits that range ends (one process's version: tests/framework/train)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dist_cases_resume import resume_recipe

from framework.checkpoint.io import load_checkpoint

GBS = 8  # resume_recipe's global batch
POISON = (8 * GBS, 9 * GBS)  # step 9's samples; checkpoints every 4 steps


def _recipe(run_dir: Path, data: Path):
    recipe = resume_recipe(run_dir, data, steps=11, every=4, dp_shard=2, data_parallel="fsdp")
    recipe.optim.lr = 3e-3
    return recipe


def test_fsdp2_rewind_equals_a_run_without_the_range(dist_pool, tmp_path: Path, demo_data: Path) -> None:
    recipe = _recipe(tmp_path / "rewind", demo_data)
    recipe.train.spike_sigma, recipe.train.spike_window, recipe.train.spike_policy = 3.0, 4, "rewind"
    reads = dist_pool(2).run("dist_cases_resume:run_poisoned", recipe, POISON, 4000)
    assert sorted(g for r in reads for g in r) == list(range(*POISON))  # each rank its half, once
    (record,) = [json.loads(x) for x in (tmp_path / "rewind" / "skipped_data.jsonl").read_text().splitlines()]
    assert record["spike_step"] == 9 and record["rewound_to_step"] == 8 and record["samples"] == list(POISON)

    plain = _recipe(tmp_path / "plain", demo_data)
    plain.data.skip_samples = [POISON]
    reads = dist_pool(2).run("dist_cases_resume:run_poisoned", plain, POISON, 4000)
    assert reads == [[], []]
    final = "checkpoints/step_00000011"
    ours = load_checkpoint(tmp_path / "rewind" / final, template=None, distributed=False).state["model"]
    theirs = load_checkpoint(tmp_path / "plain" / final, template=None, distributed=False).state["model"]
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
