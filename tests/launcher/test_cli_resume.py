"""`loom train` into a run directory, and `--resume`: a checkpoint that cannot be loaded, a run dir that holds a run
(refused, or moved aside whole with --overwrite), a file where a folder goes, a run dir another run holds, a resume
that would change what data comes next, and a finished run resumed: one line on stderr, exit status 2, nothing
lost."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _argv(run_dir: Path, data: Path, d_model: int, *extra: str) -> list[str]:
    sets = {
        "model.d_model": d_model,
        "model.n_layers": 1,
        "model.n_heads": 4,
        "model.kv_heads": 2,
        "model.ffn_hidden": 64,
        "data.tokenizer": data / "tokenizer.model",
        "data.train": data,
        "data.validation": "null",
        "data.verify": "size",
        "train.steps": 1,
        "train.global_batch_size": 2,
        "train.micro_batch_size": 2,
        "train.device": "cpu",
        "logging.run_dir": run_dir,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    return [
        "train",
        str(ROOT / "recipes/debug.yaml"),
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        *extra,
    ]


def test_resume_of_another_model_shape_is_one_line(
    demo_data, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tmp_path / "a", demo_data, 32)) == 0
    checkpoint = tmp_path / "a" / "checkpoints"
    before = sorted(p.name for p in checkpoint.iterdir())
    capsys.readouterr()
    assert main(_argv(tmp_path / "b", demo_data, 48, "--resume", str(checkpoint))) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "holds another model" in err
        and "[32, 32] in the checkpoint, [48, 48] in the model" in err
    ), err
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # the checkpoint is untouched


def test_resume_of_a_truncated_checkpoint_is_one_line(demo_data, tmp_path, capsys) -> None:
    assert main(_argv(tmp_path / "a", demo_data, 32)) == 0
    step = tmp_path / "a" / "checkpoints" / "step_00000001"
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    capsys.readouterr()
    assert main(_argv(tmp_path / "b", demo_data, 32, "--resume", str(step))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "truncated" in err, err


# -- a run directory that holds a run (framework/run_dir.py) -------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256): what a refusal must leave as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _train(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return _argv(run_dir, data, 32, *extra)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("loom: error:") and "Traceback" not in err, err
    return err


def _train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("outside", [False, True], ids=["checkpoints-in-run-dir", "checkpoint-dir-outside"])
def test_a_new_run_into_a_run_with_checkpoints_is_refused(demo_data, tmp_path, capsys, outside) -> None:
    extra = ["--set", f"checkpoint.dir={tmp_path / 'ckpts'}"] if outside else []
    run_dir = tmp_path / "run"
    assert main(_train(run_dir, demo_data, *extra)) == 0
    before = _tree(tmp_path)
    capsys.readouterr()
    # the same run dir, or (outside) another run dir with the same checkpoint.dir
    again = tmp_path / "other" if outside else run_dir
    assert main(_train(again, demo_data, *extra)) == 2
    err = _one_line(capsys)
    assert "already holds checkpoints" in err and "checkpoint.dir" in err, err
    assert "--resume auto" in err and "new logging.run_dir" in err and "--overwrite" in err, err
    assert _tree(tmp_path) == before and not (tmp_path / "other").exists()


@pytest.mark.parametrize("outside", [False, True], ids=["checkpoints-in-run-dir", "checkpoint-dir-outside"])
def test_overwrite_moves_the_old_run_aside_whole(demo_data, tmp_path, capsys, outside) -> None:
    ckpts = tmp_path / "ckpts"
    extra = ["--set", f"checkpoint.dir={ckpts}"] if outside else []
    run_dir = tmp_path / "run"
    assert main(_train(run_dir, demo_data, *extra, "--set", "train.steps=3")) == 0
    old_run, old_ckpts = _tree(run_dir), _tree(ckpts) if outside else None
    assert main(_train(run_dir, demo_data, *extra, "--overwrite")) == 0  # a new run of 1 step
    assert _tree(tmp_path / "run.old-1") == old_run  # kept whole, byte for byte
    if outside:
        assert _tree(tmp_path / "ckpts.old-1") == old_ckpts
    assert _train_steps(run_dir) == [1]
    # --resume auto now continues the new run (step 1 -> 2), not the old one's step 3
    assert main(_train(run_dir, demo_data, *extra, "--set", "train.steps=2", "--resume", "auto")) == 0
    assert _train_steps(run_dir) == [1, 2]
    new_root = ckpts if outside else run_dir / "checkpoints"
    assert (new_root / "latest").read_text().strip() == "step_00000002"
    assert _tree(tmp_path / "run.old-1") == old_run
    capsys.readouterr()
    assert main(_train(run_dir, demo_data, "--overwrite", "--resume", "auto")) == 2
    assert "pass one of them" in _one_line(capsys)


@pytest.mark.parametrize(
    "key,where",
    [("logging.run_dir", "file"), ("checkpoint.dir", "file"), ("logging.run_dir", "file/run")],
)
def test_a_run_folder_that_is_a_file_is_one_line(demo_data, tmp_path, capsys, key, where) -> None:
    (tmp_path / "file").write_text("mine\n")
    run_dir = tmp_path / where if key == "logging.run_dir" else tmp_path / "run"
    extra = ["--set", f"{key}={tmp_path / where}"] if key != "logging.run_dir" else []
    assert main(_train(run_dir, demo_data, *extra)) == 2
    err = _one_line(capsys)
    assert key in err and "not a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "mine\n"


_HOLD_LOCK = """
import sys
from pathlib import Path
from framework.run_dir import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_a_locked_run_dir_is_refused_with_the_holder(demo_data, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(run_dir)
        assert main(_train(run_dir, demo_data, "--resume", "auto")) == 2
        err = _one_line(capsys)
        assert (
            f"host {socket.gethostname()}, pid {holder.pid}" in err and "in use by another loom train" in err
        )
        assert _tree(run_dir) == before  # nothing written: no checkpoints, no metrics
    finally:
        holder.kill()  # SIGKILL: the lock file (with the dead holder's pid) stays; the kernel dropped the flock
        holder.wait()
    assert f'"pid": {holder.pid}' in (run_dir / ".loom-lock").read_text()
    assert main(_train(run_dir, demo_data)) == 0  # a stale lock file does not block
    assert _train_steps(run_dir) == [1]


# -- resume compatibility (framework/train/resume_check.py) ------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        "data.seq_len=64",
        "train.seed=7",
        "data.seed=9",
        "train.global_batch_size=4",
        "data.train=[{data},{data}]",
        "data.weights=[1.0]",
    ],
)
def test_resume_refuses_a_change_of_what_data_comes_next(demo_data, tmp_path, capsys, change) -> None:
    run_dir = tmp_path / "run"
    assert main(_train(run_dir, demo_data)) == 0
    before = _tree(run_dir)
    capsys.readouterr()
    changed = ["--set", change.format(data=demo_data), "--set", "train.steps=2", "--resume", "auto"]
    assert main(_train(run_dir, demo_data, *changed)) == 2
    err = _one_line(capsys)
    key = change.split("=")[0]
    assert f"{key} = " in err and "differs from" in err and "--accept-data-change" in err, err
    assert _train_steps(run_dir) == [1]
    assert _tree(run_dir) == before  # refused before anything was written (recipe.yaml too)
    assert main(_train(run_dir, demo_data, *changed, "--accept-data-change")) == 0
    assert _train_steps(run_dir) == [1, 2]


def test_resume_accepts_the_same_data_folder_by_another_path(demo_data, tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert main(_train(run_dir, demo_data)) == 0
    link = tmp_path / "demo-link"
    link.symlink_to(demo_data)
    resumed = ["--set", f"data.train={link}", "--set", "train.steps=2", "--resume", "auto"]
    assert main(_train(run_dir, demo_data, *resumed)) == 0
    assert _train_steps(run_dir) == [1, 2]


# -- a finished run -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, 1], ids=["save-final", "save-every-step"])
def test_resuming_a_finished_run_logs_no_second_validation(demo_data, tmp_path, every) -> None:
    run_dir = tmp_path / "run"
    sets = ["--set", f"data.validation={demo_data}", "--set", "train.eval_batches=1"]
    sets += ["--set", "train.eval_every=0", "--set", f"checkpoint.every={every}"]
    assert main(_train(run_dir, demo_data, *sets)) == 0
    log = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "val"' in line for line in log) == 1, log
    with pytest.warns(UserWarning, match="already finished at step 1"):
        assert main(_train(run_dir, demo_data, *sets, "--resume", "auto")) == 0
    again = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert again[: len(log)] == log and [json.loads(line)["kind"] for line in again[len(log) :]] == [
        "summary"
    ]


@pytest.mark.parametrize("where", ["cwd", "data"])
def test_overwrite_never_moves_the_inputs_or_the_working_directory(
    demo_data, tmp_path, capsys, monkeypatch, where
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    if where == "cwd":
        monkeypatch.chdir(run_dir)
        argv = _train(run_dir, demo_data, "--overwrite")
    else:  # the training data lies inside the run dir
        (run_dir / "demo").symlink_to(demo_data)
        argv = [*_train(run_dir, demo_data, "--overwrite"), "--set", f"data.train={run_dir / 'demo'}"]
    before = _tree(tmp_path)
    assert main(argv) == 2
    assert "--overwrite would move it away" in _one_line(capsys)
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
