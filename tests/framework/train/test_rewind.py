"""Loss-spike rewind (train.spike_policy: rewind) end to end on the demo corpus: a poisoned range of the data (one
repeated rare token) makes the loss spike; the run goes back to its last checkpoint in the same process, steps over
the samples consumed since it (plus spike_skip_samples) and goes on. Its final model equals, bit for bit, a run
whose data order simply omits that range (data.skip_samples) and which never spiked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import demo_run_recipe

from framework.config import Recipe
from framework.data import Tokenizer
from framework.data.show import show_samples
from framework.data.source import TrainSource
from framework.run import train

GBS, STEPS, EVERY = 4, 12, 4
POISON = range(8 * GBS, 9 * GBS)  # the samples of step 9: the last checkpoint before it is step 8's


def _recipe(run_dir: Path, data: Path) -> Recipe:
    recipe = demo_run_recipe(run_dir, data, steps=STEPS, global_batch=GBS, micro_batch=2, every=EVERY)
    recipe.optim.lr, recipe.schedule.warmup_steps = 3e-3, 2
    return recipe


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """TrainSource reads every sample of POISON as one repeated rare token; returns the poisoned indices read."""
    read: list[int] = []
    original = TrainSource.micro_batch

    def micro_batch(self: TrainSource, global_indices: list[int]) -> dict[str, torch.Tensor]:
        batch = original(self, global_indices)
        for row, g in enumerate(global_indices):
            if g in POISON:
                read.append(g)
                batch["input_ids"][row] = 4000
                batch["labels"][row] = 4000
        return batch

    monkeypatch.setattr(TrainSource, "micro_batch", micro_batch)
    return read


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from framework.checkpoint.io import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:08d}", template=None, distributed=False)
    return state.state["model"]


def test_rewind_skips_the_bad_data_and_equals_a_run_without_it(
    tmp_path: Path, demo_data: Path, poisoned: list[int]
) -> None:
    recipe = _recipe(tmp_path / "rewind", demo_data)
    recipe.train.spike_sigma, recipe.train.spike_window = 3.0, 4
    recipe.train.spike_policy, recipe.train.spike_skip_samples = "rewind", GBS
    train(recipe)
    assert sorted(set(poisoned)) == list(POISON)  # the bad batch was read once, by step 9
    rows = [r for r in _rows(tmp_path / "rewind") if r["kind"] == "train"]
    spiked = [r for r in rows if r["skipped"]]
    assert [r["step"] for r in spiked] == [9] and spiked[0]["skip_reason"] == "loss_spike", spiked
    (record,) = [json.loads(x) for x in (tmp_path / "rewind" / "skipped_data.jsonl").read_text().splitlines()]
    # back to step 8's checkpoint; skipped: step 9's samples plus the margin of one more global batch
    assert record["spike_step"] == 9 and record["rewound_to_step"] == 8
    assert record["samples"] == [8 * GBS, 10 * GBS], record

    # `loom data show --range` prints what was skipped: step 9's poisoned samples, then the margin's ordinary ones
    text = show_samples(recipe, *record["samples"])
    pieces = text.split("# sample ")[1:]
    rare = Tokenizer(recipe.data.tokenizer).decode([4000] * 8)
    assert len(pieces) == 2 * GBS
    assert [rare in p for p in pieces] == [True] * GBS + [False] * GBS

    poisoned.clear()
    plain = _recipe(tmp_path / "plain", demo_data)
    plain.data.skip_samples = [tuple(record["samples"])]
    train(plain)
    assert poisoned == []  # the replay never read the bad range
    assert not any(r["skipped"] for r in _rows(tmp_path / "plain") if r["kind"] == "train")
    ours, theirs = _final_weights(tmp_path / "rewind"), _final_weights(tmp_path / "plain")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_rewinds_that_do_not_help_halt(tmp_path: Path, demo_data: Path, poisoned: list[int]) -> None:
    """Bad data wider than the skipped range: every replay of step 9 spikes again; after train.max_rewinds rewinds
    the run halts with the diagnostics file."""
    from framework.train.callbacks.stability import TrainingHalted

    globals()["POISON"] = range(8 * GBS, 12 * GBS)  # read by the fixture's patched micro_batch
    try:
        recipe = _recipe(tmp_path / "run", demo_data)
        recipe.train.spike_sigma, recipe.train.spike_window = 3.0, 4
        recipe.train.spike_policy, recipe.train.max_rewinds = "rewind", 2
        with pytest.raises(TrainingHalted, match="max_rewinds"):
            train(recipe)
    finally:
        globals()["POISON"] = range(8 * GBS, 9 * GBS)
    lines = (tmp_path / "run" / "skipped_data.jsonl").read_text().splitlines()
    # each rewind skips from the checkpoint's data position (step 8's, both times) to the end of the spiking step
    assert [json.loads(x)["samples"] for x in lines] == [[8 * GBS, 9 * GBS], [8 * GBS, 10 * GBS]]
    assert list((tmp_path / "run").glob("halt_step_*.json"))
