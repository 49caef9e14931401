"""Prepared shards are verified on read: a corrupt sample (token id >= vocab, bad document starts), a corrupt or
edited `.idx`, and a malformed manifest are each one ConfigError naming the file (and the sample), never an
IndexError in the embedding or a ValueError from numpy; with num_workers > 0 the error still arrives as one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.shards import MANIFEST, PreparedSplit
from framework.data.source import build_data
from framework.data.tokenizer import Tokenizer

MODEL = ModelConfig(vocab_size=512)
SEQ = 32


@pytest.fixture
def data(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared dataset, to damage."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in prepared.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


@pytest.fixture
def cfg(data: Path, tiny_tokenizer: Tokenizer) -> DataConfig:
    # verify=size: the hash would catch the damage at start; these checks are the ones that remain.
    return DataConfig(
        tokenizer=str(tiny_tokenizer.path), train=str(data), validation=None, seq_len=SEQ, verify="size"
    )


def poke(data: Path, shard: str, row: int, what: str, value: int | None) -> int:
    """Overwrite in place (same size) the first token, or the first document start, of row `row` of `shard`
    (for starts: of the first row from `row` on that has one); value None: another valid token id. Returns
    the row."""
    index = np.load(data / f"{shard}.idx")
    if what == "starts":
        row = next(r for r in range(row, len(index)) if index[r, 2] > 0)
    offset = int(index[row, 0] if what == "tokens" else index[row, 1])
    dtype = np.dtype("<u2") if what == "tokens" else np.dtype("<i4")
    raw = bytearray((data / f"{shard}.tar").read_bytes())
    if value is None:
        value = (int(np.frombuffer(raw, dtype, 1, offset)[0]) + 1) % 300
    raw[offset : offset + dtype.itemsize] = np.array([value], dtype).tobytes()
    (data / f"{shard}.tar").write_bytes(bytes(raw))
    return row


def read_all(cfg: DataConfig, num_workers: int) -> None:
    source = build_data(replace(cfg, num_workers=num_workers), MODEL)[0]
    stream = source.batches(8, 8)
    for _ in range(-(-len(source.datasets[0]) // 8) + 1):  # more than one epoch: every sample is read
        next(stream)


@pytest.mark.parametrize(
    ("what", "value", "expected"),
    [
        ("tokens", 65535, "token id 65535"),
        ("tokens", 400, "token id 400"),  # the first id past the tokenizer's 400 pieces (the model has 512)
        ("starts", 0, "document starts"),
        ("starts", SEQ + 1, "document starts"),
    ],
)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_sample_is_one_error_naming_shard_and_sample(
    cfg: DataConfig, data: Path, what: str, value: int, expected: str, num_workers: int
) -> None:
    sample = 64 + poke(data, "train-00001", 6, what, value)  # shards hold 64 samples
    with pytest.raises(ConfigError) as info:
        read_all(cfg, num_workers)
    message = str(info.value)
    assert (
        f"{data / 'train-00001.tar'}: " in message and f"sample {sample} " in message and expected in message
    )
    assert "\n" not in message and info.value.key == "data.train"


def test_an_intact_dataset_reads_every_sample(cfg: DataConfig) -> None:
    read_all(cfg, 0)  # the checks do not refuse good data (every sample, both document-start edges)


def rewrite_index(data: Path, shard: str, change: Any) -> None:
    path = data / f"{shard}.idx"
    index = np.load(path)
    with open(path, "wb") as f:
        np.save(f, change(index.copy()), allow_pickle=False)


def set_index_bytes(data: Path, shard: str) -> None:
    """Make the manifest agree with the .idx's new size (an edit that a size check cannot see)."""
    manifest = json.loads((data / MANIFEST).read_text())
    for record in manifest["splits"]["train"]["shards"]:
        if record["name"] == shard:
            record["idx"]["bytes"] = (data / f"{shard}.idx").stat().st_size
    (data / MANIFEST).write_text(json.dumps(manifest))


def garbage(data: Path) -> None:
    path = data / "train-00000.idx"
    path.write_bytes(b"\x93NUMPY garbage".ljust(path.stat().st_size, b"x"))


def pickled(data: Path) -> None:
    with open(data / "train-00000.idx", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    set_index_bytes(data, "train-00000")


def offset(column: int, value: int) -> Any:
    def change(index: np.ndarray) -> np.ndarray:
        index[3, column] = value
        return index

    return lambda data: rewrite_index(data, "train-00000", change)


INDEX_DAMAGE = {
    "garbage of the same size": (garbage, "not a readable .npy index"),
    "a pickled object array": (pickled, "not a readable .npy index"),
    "wrong dtype": (lambda d: rewrite_index(d, "train-00000", lambda i: i.astype(np.float64)), "int64"),
    "token offset past the tar": (offset(0, 10**9), "outside"),
    "negative offset": (offset(1, -8), "outside"),
    "too many starts": (offset(2, SEQ + 5), "outside"),
}


@pytest.mark.parametrize("case", INDEX_DAMAGE)
def test_a_corrupt_index_is_one_error_naming_it(cfg: DataConfig, data: Path, case: str) -> None:
    damage, expected = INDEX_DAMAGE[case]
    damage(data)
    with pytest.raises(ConfigError) as info:
        build_data(cfg, MODEL)
    message = str(info.value)
    assert message.startswith(f"{data / 'train-00000.idx'}: ") and expected in message and "\n" not in message


def edit_manifest(data: Path, change: Any) -> None:
    manifest = json.loads((data / MANIFEST).read_text())
    change(manifest)
    (data / MANIFEST).write_text(json.dumps(manifest))


MANIFEST_DAMAGE = {
    "not JSON": (lambda d: (d / MANIFEST).write_text("{not json"), "not valid JSON"),
    "not UTF-8": (lambda d: (d / MANIFEST).write_bytes(b'{"format": "\xff"}'), "not valid JSON"),
    "a list": (lambda d: (d / MANIFEST).write_text("[]"), "manifest"),
    "no splits": (lambda d: edit_manifest(d, lambda m: m.pop("splits")), "splits"),
    "no train split": (lambda d: edit_manifest(d, lambda m: m["splits"].pop("train")), "'train' split"),
    "a shard name with a path": (
        lambda d: edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(name="../../etc/x")),
        "plain file name",
    ),
    "an unknown dtype": (lambda d: edit_manifest(d, lambda m: m.update(dtype="int8")), "dtype"),
    "seq_len a string": (lambda d: edit_manifest(d, lambda m: m.update(seq_len="32")), "seq_len"),
    "samples missing": (
        lambda d: edit_manifest(d, lambda m: m["splits"]["train"]["shards"][1].pop("samples")),
        "shards[1] samples",
    ),
    "no vocab size": (lambda d: edit_manifest(d, lambda m: m["tokenizer"].pop("vocab_size")), "vocab_size"),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_a_malformed_manifest_is_one_error_naming_it(data: Path, case: str) -> None:
    damage, expected = MANIFEST_DAMAGE[case]
    damage(data)
    with pytest.raises(ConfigError) as info:
        PreparedSplit(data, "train", "data.train")
    message = str(info.value)
    assert str(data / MANIFEST) in message and expected in message and "\n" not in message


def test_a_shard_replaced_after_opening_is_refused_before_reading(data: Path) -> None:
    split = PreparedSplit(data, "train", "data.train")
    (data / "train-00000.tar").write_bytes(b"short")
    with pytest.raises(ConfigError, match="replaced while in use"):
        split.sample(0)


def test_sha256_is_checked_when_the_dataset_is_opened(cfg: DataConfig, data: Path) -> None:
    poke(data, "train-00001", 6, "tokens", None)  # a valid id: only the hash can tell
    build_data(cfg, MODEL)
    with pytest.raises(ConfigError, match="sha256 differs"):
        build_data(replace(cfg, verify="sha256"), MODEL)
