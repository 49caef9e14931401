"""Progress on stderr (framework/train/callbacks/progress.py): plain lines every log_every steps when the stream is
not a terminal (Slurm logs, pipes), the tqdm bar when it is."""

from __future__ import annotations

import io
import json
import re

import pytest
from train_helpers import make_batches, make_model, make_recipe

from framework.train import MetricsLogger, Trainer, TrainModule
from framework.train.callbacks.progress import LineProgress, format_duration

LINE = re.compile(
    r"train step (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| ([\d,]+) tokens/s \| "
    r"elapsed (\d+:\d\d:\d\d) \| ETA (\d+:\d\d:\d\d)"
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit(tmp_path, stream, steps: int = 5, log_every: int = 2) -> list[dict]:
    overrides = {"logging.progress_bar": True, "logging.log_every": log_every, "train.steps": steps}
    recipe = make_recipe(tmp_path, overrides)
    logger = MetricsLogger(recipe.logging, total_steps=steps, stream=stream)
    Trainer(TrainModule(make_model(), recipe, "cpu"), make_batches(steps), [logger], recipe).fit()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_not_a_terminal_gives_one_line_per_logged_step(tmp_path) -> None:
    stream = io.StringIO()  # isatty() is False, as for a Slurm log file or a pipe
    records = _fit(tmp_path, stream)
    lines = stream.getvalue().splitlines()
    assert [r["step"] for r in records] == [2, 4, 5]
    assert len(lines) == len(records)  # nothing else: no bar, no carriage returns
    for line, record in zip(lines, records, strict=True):
        match = LINE.fullmatch(line)
        assert match, line
        step, total, loss, lr, rate, _, _ = match.groups()
        assert (int(step), int(total)) == (record["step"], 5)
        assert loss == f"{record['loss']:.4f}" and lr == f"{record['lr']:.2e}"
        assert int(rate.replace(",", "")) == round(record["tokens_per_s"])
    assert lines[-1].endswith("ETA 0:00:00")  # the last step: nothing left


def test_a_terminal_gets_the_bar(tmp_path) -> None:
    stream = _Terminal()
    _fit(tmp_path, stream)
    text = stream.getvalue()
    assert "train:" in text and "5/5" in text and "\r" in text
    assert "train step" not in text


def test_elapsed_and_eta_come_from_the_steps_of_this_launch() -> None:
    now = [100.0]
    progress = LineProgress(total=10, initial=4, stream=io.StringIO(), clock=lambda: now[0])  # resumed at 4
    now[0] = 130.0  # 2 steps (5, 6) took 30 s: the 4 left take 60 s
    line = progress.line({"step": 6, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.4})
    assert line == (
        "train step 6/10 | loss 2.5000 | lr 1.00e-03 | 1,234 tokens/s | elapsed 0:00:30 | ETA 0:01:00"
    )
    unknown = progress.line({"step": 4, "loss": None, "lr": 1e-3, "tokens_per_s": None})
    assert "loss nan" in unknown and "nan tokens/s" in unknown and unknown.endswith("ETA ?")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00:00"), (59.4, "0:00:59"), (3725.2, "1:02:05"), (90061, "25:01:01")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
