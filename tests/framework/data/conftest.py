"""Shared fixtures: a tiny tokenizer trained on a few stdlib docstrings (no dependency on data/demo)."""

from __future__ import annotations

import argparse
import collections
import functools
import json
import textwrap
from pathlib import Path

import pytest

from framework.data.stdlib_docs import docstrings
from framework.data.tokenizer import Tokenizer, train_tokenizer

TINY_VOCAB = 400
TINY_SENTINELS = 8


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """A few hundred real docstrings (~150 KB), collected in-process from already-imported modules."""
    return sorted(docstrings([argparse, collections, functools, json, textwrap]))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory, small_texts: list[str]) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    return train_tokenizer(small_texts, path, TINY_VOCAB, num_sentinels=TINY_SENTINELS, num_threads=1)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """One {"text": ...} per line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, small_texts: list[str]) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", small_texts)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, tiny_tokenizer: Tokenizer) -> Path:
    """The small corpus prepared at seq_len 32 into shards of 64 samples (several shards per split)."""
    from framework.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare([corpus_file], out, tiny_tokenizer.path, 32, val_fraction=0.1, shard_samples=64, progress=False)
    return out
