"""Progress of a run on stderr (rank 0, `logging.progress_bar`): a tqdm bar when the stream is a terminal, else one
plain line per logged step, so a Slurm log or a pipe holds readable lines instead of a bar's carriage-return
redraws."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded), e.g. 3725.2 -> '1:02:05'."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _number(value: float | None, spec: str) -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)


class BarProgress:
    """The tqdm bar: one tick per step, loss and learning rate of the last logged step beside it."""

    def __init__(self, total: int, initial: int, stream: IO[str]) -> None:
        self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=stream)

    def advance(self) -> None:
        self._bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        self._bar.set_postfix(
            loss=_number(record["loss"], ".4f"), lr=_number(record["lr"], ".2e"), refresh=False
        )

    def close(self) -> None:
        self._bar.close()


class LineProgress:
    """One line per train record, e.g. `train step 40/100 | loss 3.2101 | lr 1.00e-03 | 10,412 tokens/s |
    elapsed 0:01:02 | ETA 0:01:33`. Elapsed is wall time since fit start; the ETA assumes the remaining steps take
    as long on average as this launch's steps so far (checkpoints and validation included)."""

    def __init__(
        self, total: int, initial: int, stream: IO[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total, self.initial, self.stream, self.clock = total, initial, stream, clock
        self.start = clock()

    def advance(self) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        self.stream.write(self.line(record) + "\n")
        self.stream.flush()

    def line(self, record: dict[str, Any]) -> str:
        step, elapsed = record["step"], self.clock() - self.start
        done = step - self.initial
        eta = format_duration(elapsed / done * (self.total - step)) if done > 0 else "?"
        rate = record.get("tokens_per_s")
        parts = [
            f"train step {step}/{self.total}",
            f"loss {_number(record['loss'], '.4f')}",
            f"lr {_number(record['lr'], '.2e')}",
            f"{_number(rate, ',.0f')} tokens/s",
            f"elapsed {format_duration(elapsed)}",
            f"ETA {eta}",
        ]
        return " | ".join(parts)

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int, stream: IO[str]) -> BarProgress | LineProgress:
    """The bar where `stream` is a terminal, plain lines elsewhere."""
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress(total, initial, stream)
    return LineProgress(total, initial, stream)
