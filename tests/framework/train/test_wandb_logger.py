"""W&B (framework/train/callbacks/wandb_logger.py) in offline mode, no network: a real short run's offline folder
holds the same train and val values as metrics.jsonl, its summary record and the resolved recipe as config; the
run id travels in the checkpoint; nothing of W&B (service process, signal handler) outlives the run. A missing
wandb package is one ConfigError before anything is built."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from train_helpers import tiny_debug_recipe

from framework.checkpoint.io import META
from framework.config import ConfigError
from framework.config.loader import recipe_to_dict
from framework.train.callbacks.base import Callback
from framework.train.callbacks.metrics_logger import scalars
from framework.train.callbacks.wandb_logger import WandbLogger, check_wandb

# W&B's transaction log (<run>.wandb): a LevelDB-style log of protobuf Records after a 7-byte header
# (":W&B", magic 0xBEE1, version 0), in 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
# type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is padding.
_BLOCK, _HEADER = 32768, 7


def wandb_processes() -> list[str]:
    """This process's children that are W&B's (wandb-core, its service). Other children may exist: the suite's
    reused process pools, started by earlier tests, belong to it for the whole session."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:  # ended while we looked
            continue
        if "wandb" in command.lower():
            found.append(command)
    return found


def read_wandb_log(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, chunks, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:
            break  # zero padding: the end of what was written
        chunks += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_run(records: list[Any]) -> dict[str, Any]:
    """history by step, the summary, the config and the run record of one offline run."""
    out: dict[str, Any] = {"history": {}, "summary": {}, "config": {}, "run": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            out["run"] = record.run
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
    return out


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline and quiet, every folder of its own under tmp_path (nothing in ~), no credentials."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        folder = tmp_path / "wandb-home" / name.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(name, str(folder))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_offline_run_holds_what_metrics_jsonl_holds(offline_wandb, demo_data: Path, tmp_path: Path) -> None:
    from framework.run import train

    run_dir = tmp_path / "run"
    sets = ["logging.wandb.mode=offline", "logging.wandb.project=loom-test", "logging.wandb.tags=[tiny, cpu]"]
    recipe = tiny_debug_recipe(run_dir, demo_data, [*sets, "train.steps=4", "train.eval_every=2"])
    hook = sys.excepthook
    train(recipe)

    assert wandb_processes() == []  # the wandb-core service was stopped
    assert sys.excepthook is hook  # wandb.init's own hook was put back
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    got = _offline_run(read_wandb_log(log))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "train", "val", "train", "train", "val", "summary"]
    for row in rows[:-1]:
        values = dict(scalars(row["kind"], {k: v for k, v in row.items() if k != "kind"}))
        assert "train/loss" in values or "val/loss" in values
        logged = got["history"][row["step"]]
        assert {name: logged[name] for name in values} == pytest.approx(values, rel=1e-12)
    summary = rows[-1]
    for key, value in summary.items():
        if key != "kind" and value is not None:
            want = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
            assert got["summary"][f"summary/{key}"] == want, key
    assert got["summary"]["summary/train_loss"] == summary["train_loss"]

    config = {k: v for k, v in got["config"].items() if not k.startswith("_")}
    assert config == json.loads(json.dumps(recipe_to_dict(recipe)))
    run = got["run"]
    assert (run.project, run.display_name, list(run.tags)) == ("loom-test", "run", ["tiny", "cpu"])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / META).read_text())
    assert meta["callbacks"]["WandbLogger"] == {"run_id": run.run_id}

    # A resume (a requeued job) continues the same W&B run, from the step after the checkpoint. (Its own W&B
    # dir: W&B names an offline folder by the second it started and the run id, which may both repeat here.)
    again = [*sets, "train.steps=6", "train.eval_every=2", f"logging.wandb.dir={tmp_path / 'again'}"]
    train(tiny_debug_recipe(run_dir, demo_data, again), resume="auto")
    assert wandb_processes() == []
    (log,) = (tmp_path / "again" / "wandb").glob("offline-run-*/run-*.wandb")
    resumed = _offline_run(read_wandb_log(log))
    assert resumed["run"].run_id == run.run_id and sorted(resumed["history"]) == [5, 6]


def test_a_missing_wandb_package_is_one_config_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from framework.config.loader import load_recipe
    from launcher.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec says None
    root = Path(__file__).resolve().parents[3]
    recipe = load_recipe(root / "recipes" / "debug.yaml", ["logging.wandb.mode=offline"])
    with pytest.raises(ConfigError) as error:
        WandbLogger(recipe)
    assert error.value.key == "logging.wandb.mode" and "pip install loom-pretrain[wandb]" in error.value.fix
    check_wandb(load_recipe(root / "recipes" / "debug.yaml").logging.wandb)  # disabled: nothing needed

    run_dir = tmp_path / "run"
    argv = ["train", str(root / "recipes" / "debug.yaml"), "--set", f"logging.run_dir={run_dir}"]
    assert main([*argv, "--set", "logging.wandb.mode=online"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install loom-pretrain[wandb]" in err
    assert not run_dir.exists()  # refused before the run directory was made


def test_online_without_credentials_is_one_config_error(offline_wandb, tmp_path: Path, monkeypatch) -> None:
    from framework.config.loader import load_recipe

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv(
        "WANDB_BASE_URL", "http://127.0.0.1:9"
    )  # nothing listens: no request leaves the machine
    root = Path(__file__).resolve().parents[3]
    sets = [f"logging.run_dir={tmp_path / 'run'}", "logging.wandb.mode=online"]
    logger = WandbLogger(load_recipe(root / "recipes" / "debug.yaml", sets))
    hook = sys.excepthook
    with pytest.raises(ConfigError) as error:
        logger.on_fit_start(None)
    assert error.value.key == "logging.wandb.mode" and "wandb login" in error.value.fix
    assert "API key" in error.value.rule
    assert wandb_processes() == [] and sys.excepthook is hook


@pytest.mark.parametrize("ending", ["preempted", "failed"])
def test_a_preempted_run_is_marked_and_a_failed_one_exits_1(
    offline_wandb, tmp_path: Path, ending: str
) -> None:
    from train_helpers import SignalAt, make_batches, make_model, make_recipe

    from framework.train import Checkpointer, MetricsLogger, Trainer, TrainModule
    from framework.train.callbacks.preemption import Preempted
    from framework.train.callbacks.summary import RunSummary

    recipe = make_recipe(tmp_path)
    recipe.logging.wandb.mode = "offline"
    checkpointer = Checkpointer(recipe)
    stop = SignalAt(checkpointer, 2) if ending == "preempted" else _FailAt(2)
    summary = RunSummary(recipe, checkpointer=checkpointer)
    callbacks = [
        MetricsLogger(recipe.logging, total_steps=6),
        stop,
        checkpointer,
        summary,
        WandbLogger(recipe),
    ]
    trainer = Trainer(TrainModule(make_model(), recipe, "cpu"), make_batches(6), callbacks, recipe)
    with pytest.raises(Preempted if ending == "preempted" else RuntimeError):
        trainer.fit()
    assert wandb_processes() == []
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_log(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    got = _offline_run(records)
    assert sorted(got["history"]) == [1, 2]
    if ending == "preempted":
        assert "preempting" in kinds and exit_record.exit_code == 0
        assert got["summary"]["summary/status"] == "preempted" and got["summary"]["summary/step"] == 2
    else:
        assert "preempting" not in kinds and exit_record.exit_code == 1
        assert not any(key.startswith("summary/") for key in got["summary"])


class _FailAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if metrics["step"] == self.step:
            raise RuntimeError("boom")
