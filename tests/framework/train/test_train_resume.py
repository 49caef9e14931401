import json

import pytest
import torch
from train_helpers import IndexedBatches, make_batches, make_model, make_recipe

from framework.checkpoint import latest_checkpoint
from framework.config import ConfigError
from framework.train import Checkpointer, MetricsLogger, Stability, Trainer, TrainModule

OVERRIDES = {
    "train.steps": 6,
    "checkpoint.every": 3,
    "checkpoint.keep_last": 5,
    "schedule.name": "cosine",
    "schedule.warmup_steps": 2,
    "train.spike_sigma": 50.0,
    "train.spike_window": 2,
}


def _run(run_dir, resume=None, seed=0, changes=None, accept_data_change=False):
    recipe = make_recipe(run_dir, OVERRIDES | (changes or {}))
    module = TrainModule(make_model(seed=seed, dropout=0.2), recipe, "cpu")  # dropout: the RNG state matters
    callbacks = [
        MetricsLogger(recipe.logging, total_steps=recipe.train.steps),
        Stability(recipe.train, run_dir),
        Checkpointer(recipe, resume=resume, accept_data_change=accept_data_change),
    ]
    # Shuffled per run would break equality; a positioned source resumes where it stopped.
    Trainer(module, IndexedBatches(make_batches(6)), callbacks, recipe).fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return module, {r["step"]: r for r in records}


def test_resume_gives_bitwise_identical_steps(tmp_path):
    full, full_records = _run(tmp_path / "full")
    step3 = tmp_path / "full" / "checkpoints" / "step_00000003"
    # A different init (seed 123): the checkpoint must overwrite all of it.
    resumed, resumed_records = _run(tmp_path / "resumed", resume=step3, seed=123)
    assert sorted(resumed_records) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert resumed_records[step][key] == full_records[step][key], (step, key)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert resumed.counters == full.counters


def test_checkpoint_metadata_and_auto_resume(tmp_path):
    _run(tmp_path)
    meta = json.loads((tmp_path / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 6 * 32 and meta["format_version"] == 1
    assert meta["data_state"] == {"position": 6}
    assert meta["recipe"]["train"]["steps"] == 6 and meta["recipe"]["optim"]["betas"] == [0.9, 0.95]
    assert meta["callbacks"]["Stability"]["accepted"] and meta["layout"] == {"world_size": 1}
    own = json.loads((tmp_path / "checkpoints" / "step_00000006" / "rank_00000.json").read_text())
    assert own["rank"] == 0 and len(own["rng"]["torch"]) > 0
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006"
    module, records = _run(tmp_path, resume="auto")  # already at train.steps: nothing to do, nothing re-saved
    assert module.step == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000006",
    ]


def test_auto_resume_without_checkpoints_starts_fresh(tmp_path):
    module, records = _run(tmp_path, resume="auto")
    assert sorted(records) == [1, 2, 3, 4, 5, 6]


def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    """The newest checkpoint lost bytes of a shard (a disk that filled up, a copy cut short): --resume auto warns,
    names it, and resumes from the one before, continuing exactly as the uninterrupted run."""
    full, full_records = _run(tmp_path / "full")
    _run(tmp_path / "run")
    shard = next((tmp_path / "run" / "checkpoints" / "step_00000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=r"skipping checkpoint of step 6: .*truncated"):
        resumed, records = _run(tmp_path / "run", resume="auto")
    assert resumed.step == 6 and [records[s]["loss"] for s in (4, 5, 6)] == [
        full_records[s]["loss"] for s in (4, 5, 6)
    ]


@pytest.mark.parametrize(
    "key,value", [("train.seed", 5), ("train.global_batch_size", 16), ("data.seq_len", 32)]
)
def test_the_checkpointer_refuses_a_resume_that_changes_the_data(tmp_path, key, value):
    """The Checkpointer checks the checkpoint it loads (every rank; under `loom train` the run-dir guard refused
    it before anything was written already): one ConfigError naming the field, old and new values."""
    _run(tmp_path / "a")
    step3 = tmp_path / "a" / "checkpoints" / "step_00000003"
    old = json.loads((step3 / "meta.json").read_text())["recipe"][key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(ConfigError, match=rf"{key} = {value}: differs from {old} in the checkpoint"):
        _run(tmp_path / "b", resume=step3, changes={key: value})
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before the first step


def test_accept_data_change_resumes_with_the_new_value(tmp_path):
    _run(tmp_path / "a")
    step3 = tmp_path / "a" / "checkpoints" / "step_00000003"
    module, records = _run(tmp_path / "b", resume=step3, changes={"train.seed": 5}, accept_data_change=True)
    assert module.step == 6 and sorted(records) == [4, 5, 6]


def test_a_missing_rank_rng_file_warns_its_real_reason(tmp_path, recwarn):
    _run(tmp_path)
    step3 = tmp_path / "checkpoints" / "step_00000003"
    (step3 / "rank_00000.json").unlink()
    meta = json.loads((step3 / "meta.json").read_text())
    checkpointer = Checkpointer(make_recipe(tmp_path, OVERRIDES))
    with pytest.warns(UserWarning, match=r"rank_00000\.json is missing from .*step_00000003: random-number"):
        checkpointer._restore_rng(step3, meta, torch.device("cpu"))
    assert not any("another layout" in str(w.message) for w in recwarn)
