"""The bundled demo corpus: collection, prose filter, split, build, manifest and no-op rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from framework.data.demo import (
    MANIFEST,
    build_demo_data,
    collect_documents,
    finished_manifest,
    is_prose,
    split_documents,
)
from framework.data.token_file import read_sidecar
from framework.data.tokenizer import Tokenizer

MODULES = ["argparse", "collections", "json", "textwrap", "string"]


def build(out: Path) -> dict:
    return build_demo_data(out, 400, num_sentinels=8, val_fraction=0.2, num_threads=1, modules=MODULES)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build(out)


def test_build_writes_consistent_files(built: tuple[Path, dict]) -> None:
    out, manifest = built
    assert json.loads((out / MANIFEST).read_text()) == manifest
    tokenizer = Tokenizer(out / "tokenizer.model")
    for name in ("train", "val"):
        meta = read_sidecar(out / f"{name}.bin", f"data.{name}")
        tokens = np.fromfile(out / f"{name}.bin", dtype="<u2")
        assert meta["dtype"] == "uint16" and meta["tokens"] == len(tokens) == manifest["tokens"][name]
        assert meta["tokenizer_sha256"] == tokenizer.sha256
        # one eos per document, and the stream ends with one
        assert int((tokens == tokenizer.eos_id).sum()) == meta["documents"] == manifest["documents"][name] > 0
        assert tokens[-1] == tokenizer.eos_id and int(tokens.max()) < tokenizer.vocab_size


def test_rebuild_is_a_no_op_and_a_fresh_build_gives_the_same_bytes(
    built: tuple[Path, dict], tmp_path: Path
) -> None:
    out, manifest = built
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert build(out) == manifest
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    assert build(tmp_path)["files"] == manifest["files"]  # same machine, same bytes


def test_half_built_or_edited_directories_are_rebuilt(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = built
    assert finished_manifest(out, manifest["params"]) == manifest
    assert finished_manifest(out, {**manifest["params"], "vocab_size": 500}) is None
    assert finished_manifest(tmp_path) is None  # no manifest: not finished
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in [*manifest["files"], MANIFEST]:
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "val.bin").write_bytes(b"")
    assert finished_manifest(copy) is None
    assert build(copy)["files"] == manifest["files"]


def test_prose_filter() -> None:
    assert is_prose("Return the number of items in the container.")
    assert not is_prose("-self")
    assert not is_prose(">>> f(b'\\x00\\x01')\n1234\n>>> f(b'\\xff')\n255")
    assert not is_prose("Это документ на русском языке, не английском.")


def test_split_depends_on_the_text_only() -> None:
    docs = [f"document number {i} about things" for i in range(2000)]
    train, val = split_documents(docs, 0.05)
    assert 60 < len(val) < 140 and len(train) + len(val) == 2000
    assert split_documents(docs[::-1], 0.05)[1] == val[::-1]


def test_whole_stdlib_collection() -> None:
    docs = collect_documents()
    assert 1_000_000 < sum(len(d) for d in docs) < 20_000_000
    assert len(set(docs)) == len(docs) and all(is_prose(d) for d in docs)
    assert any(d.startswith('The "if" statement') for d in docs)  # help() topics are included
