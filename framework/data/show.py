"""`loom data show RECIPE --range START:END`: the text of global training samples [START, END) of a recipe's data
order, e.g. a range a loss-spike rewind skipped (runs/*/skipped_data.jsonl), to see what the bad data was."""

from __future__ import annotations

from framework.config import ConfigError, Recipe
from framework.data.source import build_data
from framework.data.tokenizer import Tokenizer

MAX_SAMPLES = 4096
"""Samples one call prints at most (a range is for reading, not for dumping a corpus)."""


def parse_range(text: str) -> tuple[int, int]:
    """'START:END' -> (start, end), 0 <= start < end, at most MAX_SAMPLES apart; a ConfigError otherwise."""
    parts = text.split(":")
    ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
    start, end = (int(parts[0]), int(parts[1])) if ok else (0, 0)
    if not ok or not 0 <= start < end:
        raise ConfigError("command line", "--range", text, "must be START:END with 0 <= START < END",
                          "e.g. --range 2048:2560 (a `samples` pair of skipped_data.jsonl)")  # fmt: skip
    if end - start > MAX_SAMPLES:
        raise ConfigError("command line", "--range", text, f"spans more than {MAX_SAMPLES} samples",
                          "show a shorter range")  # fmt: skip
    return start, end


def show_samples(recipe: Recipe, start: int, end: int) -> str:
    """Each global sample of [start, end): its index, (dataset, sample) and its tokens decoded."""
    tokenizer = Tokenizer(recipe.data.tokenizer)
    source, _ = build_data(recipe.data, recipe.model, tokenizer)
    lines = []
    for g in range(start, end):
        dataset, sample = source.sample_id(g)
        ids = source.micro_batch([g])["input_ids"][0].tolist()
        lines.append(f"# sample {g} (dataset {dataset}, sample {sample}, {len(ids)} tokens)")
        lines.append(tokenizer.decode(ids))
    return "\n".join(lines)
