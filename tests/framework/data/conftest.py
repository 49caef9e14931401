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
