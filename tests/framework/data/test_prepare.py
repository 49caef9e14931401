"""`loom data prepare`: packing keeps every token once, deterministic output, manifest, interruption, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import framework.data.prepare as prepare_module
from framework.config.errors import ConfigError
from framework.data.documents import is_validation
from framework.data.prepare import prepare
from framework.data.shards import MANIFEST, PreparedSplit
from framework.data.tokenizer import Tokenizer
from framework.outputs import OWNER_MARK, mark_owned
from launcher.cli import EXIT_USER_ERROR, main

SEQ = 32


def expected_stream(texts: list[str], tokenizer: Tokenizer, validation: bool) -> list[int]:
    """The split's documents in input order, each followed by eos."""
    stream: list[int] = []
    for text in texts:
        if is_validation(text, 0.1) == validation:
            stream += tokenizer.encode(text) + [tokenizer.eos_id]
    return stream


@pytest.mark.parametrize("split", ["train", "validation"])
def test_packing_keeps_every_token_exactly_once(
    prepared: Path, small_texts: list[str], tiny_tokenizer: Tokenizer, split: str
) -> None:
    data = PreparedSplit(prepared, split, "data.train")
    samples = [data.sample(i) for i in range(len(data))]
    stream = expected_stream(small_texts, tiny_tokenizer, split == "validation")
    owned = np.concatenate([tokens[:SEQ] for tokens, _ in samples])  # each sample owns its first SEQ tokens
    padding = len(owned) - len(stream)
    assert 0 <= padding < SEQ and owned[len(stream) :].tolist() == [tiny_tokenizer.pad_id] * padding
    assert owned[: len(stream)].tolist() == stream
    # consecutive samples overlap by one token: the causal label of a sample's last input
    assert all(samples[i][0][SEQ] == samples[i + 1][0][0] for i in range(len(samples) - 1))
    split_info = json.loads((prepared / MANIFEST).read_text())["splits"][split]
    assert split_info["tokens"] == len(stream) and split_info["samples"] == len(samples)
    assert (
        split_info["documents"] == stream.count(tiny_tokenizer.eos_id)
        and split_info["padding"] == padding + 1
    )


def test_document_boundaries_are_kept(prepared: Path, tiny_tokenizer: Tokenizer) -> None:
    data = PreparedSplit(prepared, "train", "data.train")
    for i in range(len(data) - 1):  # the last sample also starts a padding "document"
        tokens, documents = data.sample(i)
        is_eos = (tokens == tiny_tokenizer.eos_id).astype(np.int64)
        # a new document starts right after every eos, and the eos belongs to the document it ends
        assert documents.tolist() == (np.cumsum(is_eos) - is_eos).tolist()


def test_shorter_views_still_use_every_token_once(prepared: Path) -> None:
    full, half = (
        PreparedSplit(prepared, "train", "k"),
        PreparedSplit(prepared, "train", "k", seq_len=SEQ // 2),
    )
    assert len(half) == 2 * len(full)
    whole = np.concatenate([full.sample(i)[0][:SEQ] for i in range(len(full))])
    assert np.array_equal(whole, np.concatenate([half.sample(i)[0][: SEQ // 2] for i in range(len(half))]))
    with pytest.raises(ConfigError, match="must divide"):
        PreparedSplit(prepared, "train", "data.train", seq_len=24)


def shard_records(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_output_does_not_depend_on_workers_and_reruns_are_no_ops(
    prepared: Path, corpus_file: Path, tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    args = ([corpus_file], tmp_path, tiny_tokenizer.path, SEQ)
    manifest = prepare(*args, val_fraction=0.1, shard_samples=64, workers=2, progress=False)
    assert shard_records(tmp_path) == shard_records(prepared)
    stamp = (tmp_path / "train-00000.tar").stat().st_mtime_ns
    assert prepare(*args, val_fraction=0.1, shard_samples=64, workers=0, progress=False) == manifest
    assert (tmp_path / "train-00000.tar").stat().st_mtime_ns == stamp
    assert len(manifest["splits"]["train"]["shards"]) > 2
    assert manifest["tokenizer"]["sha256"] == tiny_tokenizer.sha256
    assert manifest["params"]["inputs"][0]["sha256"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_prepare_leaves_the_output_as_it_was_and_restarts_cleanly(
    prepared: Path,
    corpus_file: Path,
    tiny_tokenizer: Tokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = prepare_module.write_shard
    calls = []

    def crash_in_third_shard(out: Path, name: str, *rest: object) -> dict:
        calls.append(name)
        if len(calls) == 3:
            (out / f"{name}.tar.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(out, name, *rest)

    out = tmp_path / "out"
    args = ([corpus_file], out, tiny_tokenizer.path, SEQ)
    monkeypatch.setattr(prepare_module, "write_shard", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, val_fraction=0.1, shard_samples=64, workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind
    # Over an earlier preparation (other params, replaced with overwrite): the old one survives, whole.
    prepare(*args, val_fraction=0.1, shard_samples=128, workers=0, progress=False)
    before, calls[:] = tree(tmp_path), []
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, val_fraction=0.1, shard_samples=64, workers=0, progress=False, overwrite=True)
    assert tree(tmp_path) == before
    monkeypatch.setattr(prepare_module, "write_shard", real)
    prepare(*args, val_fraction=0.1, shard_samples=64, workers=0, progress=False, overwrite=True)
    assert shard_records(out) == shard_records(prepared) and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_runs_temporary_folder_is_removed_only_when_its_process_is_gone(
    corpus_file: Path, tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    dead = tmp_path / ".out.loom-tmp-dead0001"
    live = tmp_path / ".out.loom-tmp-live0001"
    users = tmp_path / ".out.loom-tmp-mine"  # named like ours, but no marker: a user's folder
    for folder, pid in ((dead, 2**22 + 12345), (live, os.getpid())):
        folder.mkdir()
        mark_owned(folder, prepare_module.PREPARE_KIND)
        record = json.loads((folder / OWNER_MARK).read_text())
        (folder / OWNER_MARK).write_text(json.dumps({**record, "pid": pid}))
        (folder / "train-00000.tar").write_bytes(b"partial")
    users.mkdir()
    (users / "train-00000.tar").write_bytes(b"mine")
    prepare([corpus_file], out, tiny_tokenizer.path, SEQ, shard_samples=64, workers=0, progress=False)
    assert not dead.exists() and live.exists() and (users / "train-00000.tar").read_bytes() == b"mine"


def test_cli_tokenizer_and_prepare(
    corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "tok.model"
    common = ["--val-fraction", "0.1"]
    argv = [
        "data",
        "tokenizer",
        str(corpus_file),
        "--out",
        str(model),
        "--vocab-size",
        "400",
        "--sentinels",
        "4",
    ]
    assert main([*argv, *common, "--threads", "1"]) == 0
    tokenizer = Tokenizer(model)
    assert tokenizer.vocab_size == 400 and len(tokenizer.sentinel_ids) == 4
    out = tmp_path / "out"
    argv = [
        "data",
        "prepare",
        str(corpus_file),
        "--out",
        str(out),
        "--tokenizer",
        str(model),
        "--seq-len",
        "16",
    ]
    assert main([*argv, *common, "--workers", "1", "--no-progress"]) == 0
    assert "train:" in capsys.readouterr().out
    assert PreparedSplit(out, "validation", "data.validation").manifest["seq_len"] == 16
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops"\n')
    fresh = tmp_path / "fresh"
    argv = ["data", "prepare", str(bad), "--out", str(fresh), "--tokenizer", str(model), "--seq-len", "16"]
    assert main([*argv, "--no-progress"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and err.count("\n") == 1
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl",
        "out",
        "tok.model",
    ]
