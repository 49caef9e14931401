"""`loom plot`: a picture of real short runs (two learning rates overlaid, an MoE run's per-layer load), read back
from the figure against the runs' metrics.jsonl; the resume rule of the reader (a real resume and written files);
and every bad input as one line with exit status 2, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from framework.train.metrics_reader import read_history
from launcher.cli import main
from launcher.plot import MOE_TITLE, build_figure, run_labels

ROOT = Path(__file__).resolve().parents[2]
MOE = "{n_experts: 4, top_k: 2, expert_hidden: 32}"


def _train(run_dir: Path, data: Path, *sets: str, extra: tuple[str, ...] = ()) -> None:
    """A 4-step run of a one-layer model on the demo data, validated every 2 steps."""
    values = {
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.kv_heads": 2,
        "model.ffn_hidden": 64, "data.tokenizer": data / "tokenizer.model", "data.train": data,
        "data.validation": data, "data.verify": "size", "train.steps": 4, "train.global_batch_size": 2,
        "train.micro_batch_size": 2, "train.eval_every": 2, "train.eval_batches": 1, "train.device": "cpu",
        "schedule.warmup_steps": 1, "checkpoint.save_final": "false", "logging.run_dir": run_dir,
        "logging.progress_bar": "false", "logging.tensorboard": "false",
    }  # fmt: skip
    argv = ["train", str(ROOT / "recipes/debug.yaml")]
    for item in [*(f"{k}={v}" for k, v in values.items()), *sets]:
        argv += ["--set", item]
    assert main([*argv, *extra]) == 0


def _records(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _axes(figure) -> dict:
    return {ax.get_title(): ax for ax in figure.axes}


@pytest.fixture(scope="module")
def runs(demo_data: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plot-runs")
    out = {"lr-low": root / "lr-low", "lr-high": root / "lr-high", "moe": root / "moe"}
    _train(out["lr-low"], demo_data, "optim.lr=1e-3")
    _train(out["lr-high"], demo_data, "optim.lr=1e-2")
    _train(out["moe"], demo_data, f"model.moe={MOE}")
    return out


def test_two_runs_are_overlaid_one_line_each(runs, tmp_path, capsys) -> None:
    dirs = [runs["lr-low"], runs["lr-high"]]
    out = tmp_path / "compare.png"
    assert main(["plot", *map(str, dirs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().startswith(f"wrote {out}")
    figure = build_figure([read_history(d) for d in dirs])
    width, height = figure.get_size_inches() * figure.dpi
    image = _png(out)
    assert image.shape[:2] == (round(height), round(width)) and width >= 1000 and height >= 800
    for colour in ("#1f77b4", "#ff7f0e"):  # C0 and C1: a line of each run was drawn
        assert _has_colour(image, colour), colour

    axes = _axes(figure)
    assert set(axes) == {"train loss", "validation loss", "learning rate", "gradient norm", "throughput"}
    assert figure.legends[0].get_texts()[0].get_text() == "lr-low"
    for title, kind, key in [("train loss", "train", "loss"), ("learning rate", "train", "lr"),
                             ("gradient norm", "train", "grad_norm"), ("validation loss", "val", "val_loss")]:  # fmt: skip
        lines = axes[title].get_lines()
        assert [line.get_label() for line in lines] == ["lr-low", "lr-high"], title
        for line, run_dir in zip(lines, dirs):
            records = _records(run_dir, kind)
            assert list(line.get_ydata()) == [r[key] for r in records], (title, run_dir)
            tokens = {r["step"]: r["tokens"] for r in _records(run_dir, "train")}
            assert list(line.get_xdata()) == [tokens[r["step"]] for r in records], (title, run_dir)
    low, high = (line.get_ydata() for line in axes["learning rate"].get_lines())
    assert np.allclose(high, 10 * low)  # the recipes differ in lr only


def test_x_axis_of_steps(runs, tmp_path) -> None:
    figure = build_figure([read_history(runs["lr-low"])], x="step")
    (line,) = _axes(figure)["validation loss"].get_lines()
    assert list(line.get_xdata()) == [2, 4]
    assert _axes(figure)["train loss"].get_xlabel() == "optimizer step"


def test_moe_run_plots_each_layers_imbalance(runs, tmp_path) -> None:
    out = tmp_path / "moe.svg"
    assert main(["plot", str(runs["moe"]), str(runs["lr-low"]), "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    figure = build_figure([read_history(runs["moe"]), read_history(runs["lr-low"])])
    lines = _axes(figure)[MOE_TITLE].get_lines()
    (line,) = [line for line in lines if line.get_label() != "_balanced"]  # one layer; the dense run: none
    loads = [r["moe_tokens_per_expert"][0] for r in _records(runs["moe"], "train")]
    assert np.allclose(line.get_ydata(), [max(c) / (sum(c) / len(c)) for c in loads])
    assert line.get_label() == "moe: MoE layer 0" and min(line.get_ydata()) >= 1.0


def test_a_resume_keeps_the_resumed_records(demo_data, tmp_path) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, demo_data, "checkpoint.every=2")
    first = {r["step"]: r for r in _records(run_dir, "train")}
    step2 = run_dir / "checkpoints" / "step_00000002"
    # Resumed from step 2 and stopped at step 3: steps 3 and 4 of the first start are another trajectory's
    _train(run_dir, demo_data, "train.steps=3", extra=("--resume", str(step2)))
    assert [r["step"] for r in _records(run_dir, "train")] == [1, 2, 3, 4, 3]
    assert [r["step"] for r in _records(run_dir, "val")] == [2, 4, 3]
    history = read_history(run_dir)
    assert history.train == [first[1], first[2], _records(run_dir, "train")[-1]]
    assert history.val == [_records(run_dir, "val")[0], _records(run_dir, "val")[-1]]
    (line,) = _axes(build_figure([history]))["train loss"].get_lines()
    assert (
        list(line.get_xdata())
        == [r["tokens"] for r in history.train]
        == [first[s]["tokens"] for s in (1, 2, 3)]
    )


def _write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


def _train_record(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "tokens": 256 * step, "grad_norm": 1.0}


def test_the_last_record_of_each_step_wins(tmp_path) -> None:
    first = [_train_record(s, 10.0 + s) for s in range(1, 6)]
    val = [{"kind": "val", "step": 4, "val_loss": 9.0}]
    again = [_train_record(s, 20.0 + s) for s in (3, 4)]  # resumed from step 2, then killed after step 4
    summary = {"kind": "summary", "steps": 4}  # kinds the plot does not know are skipped
    run_dir = _write(tmp_path / "run", [*first[:4], *val, first[4], *again, summary])
    history = read_history(run_dir)
    assert [(r["step"], r["loss"]) for r in history.train] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert history.val == val and not history.warnings


def test_a_partial_last_line_is_a_warning(tmp_path, capsys) -> None:
    run_dir = _write(tmp_path / "run", [_train_record(1, 5.0), _train_record(2, 4.0)], tail='{"kind": "tra')
    out = tmp_path / "p.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("loom: warning:") and "line 3 is incomplete" in err, err
    assert [r["step"] for r in read_history(run_dir).train] == [1, 2] and out.stat().st_size > 0


def test_validation_tokens_come_from_the_train_records(tmp_path) -> None:
    # Logged every 2 steps at 256 tokens a step; validated at a logged step, between two, and after the last one
    # (a run killed between its validation and its next log)
    train = [_train_record(s, 5.0) for s in (2, 4)]
    val = [{"kind": "val", "step": s, "val_loss": 4.0} for s in (2, 3, 5)]
    history = read_history(_write(tmp_path / "run", [train[0], val[0], val[1], train[1], val[2]]))
    (line,) = _axes(build_figure([history]))["validation loss"].get_lines()
    assert list(line.get_xdata()) == [2 * 256, 3 * 256, 5 * 256]


def test_labels_of_runs_with_equal_names(tmp_path) -> None:
    paths = [tmp_path / "a" / "x" / "debug", tmp_path / "b" / "x" / "debug", tmp_path / "c" / "other"]
    assert run_labels(paths) == ["a/x/debug", "b/x/debug", "other"]


def test_overwrite_replaces_an_existing_picture(tmp_path, capsys) -> None:
    run_dir = _write(tmp_path / "run", [_train_record(1, 5.0)])
    out = tmp_path / "p.png"
    out.write_bytes(b"not a picture")
    assert main(["plot", str(run_dir), "--out", str(out)]) == 2
    assert "already exists" in _one_line(capsys) and out.read_bytes() == b"not a picture"
    assert main(["plot", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert _png(out).shape[2] == 4 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


OK = '{"kind": "train", "step": 1}\n'
BAD = {
    "no run dir": (None, ["missing"], "does not exist"),
    "no metrics.jsonl": ("", ["empty"], "holds no metrics.jsonl"),
    "empty metrics.jsonl": ("\n", ["run"], "holds no train or val records"),
    "only other kinds": ('{"kind": "summary"}\n', ["run"], "holds no train or val records"),
    "broken line": ('{"kind": "train", "step": 1}\n{oops\n{"kind": "val", "step": 1}\n', ["run"], "line 2 is not valid JSON"),
    "not an object": ('{"kind": "train", "step": 1}\n[1, 2]\n', ["run"], "line 2 is list, not a JSON object"),
    "step not an integer": ('{"kind": "train", "step": "3"}\n', ["run"], "line 1: a train record without an integer step"),
    "bad extension": (OK, ["run", "--out", "{tmp}/p.jpg"], "has extension '.jpg'"),
    "out is the input": (OK, ["run", "--out", "{tmp}/run/metrics.jsonl", "--overwrite"], "is (or holds, or lies inside) the input"),
    "out is the run dir": (OK, ["run.png", "--out", "{tmp}/run.png", "--overwrite"], "is (or holds, or lies inside) the input"),
    "out is a folder": (OK, ["run", "--out", "{tmp}/folder.png", "--overwrite"], "is a folder; the output is a file"),
    "run given twice": (OK, ["run", "{tmp}/run/"], "is given twice"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line(case, tmp_path, capsys) -> None:
    content, args, expected = BAD[case]
    (tmp_path / "folder.png").mkdir()  # in the way of "out is a folder"'s --out
    if content is not None:
        (tmp_path / args[0]).mkdir()
        if content:
            (tmp_path / args[0] / "metrics.jsonl").write_text(content)
    args = [
        a if a.startswith("--") else a.format(tmp=tmp_path) if "{" in a else str(tmp_path / a) for a in args
    ]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "p.png")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["plot", *args]) == 2
    err = _one_line(capsys)
    assert expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("loom: error:") and "Traceback" not in err, err
    return err


def _png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def _has_colour(image: np.ndarray, colour: str) -> bool:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).any())
