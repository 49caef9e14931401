"""The bundled demo corpus: collection, prose filter, the build through tokenizer + prepare, no-op rebuilds, and
the exact tokenize -> detokenize round trip on the whole bundled corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import framework.data.demo as demo_module
from framework.config.errors import ConfigError
from framework.data.demo import STAMP, build_demo_data, collect_documents, finished_demo, is_prose
from framework.data.shards import MANIFEST, PreparedSplit
from framework.data.tokenizer import Tokenizer

MODULES = ["argparse", "collections", "json", "textwrap", "string"]


def build(out: Path) -> dict:
    return build_demo_data(
        out,
        400,
        num_sentinels=8,
        val_fraction=0.2,
        seq_len=32,
        num_threads=1,
        modules=MODULES,
        shard_samples=256,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build(out)


def test_build_writes_a_prepared_dataset_of_the_corpus(built: tuple[Path, dict]) -> None:
    out, manifest = built
    assert json.loads((out / MANIFEST).read_text()) == manifest
    tokenizer = Tokenizer(out / "tokenizer.model")
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256 and manifest["seq_len"] == 32
    documents = (out / "corpus.jsonl").read_text().count("\n")
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == documents
    assert 0.1 < splits["validation"]["documents"] / documents < 0.3
    assert len(splits["train"]["shards"]) > 1 and len(PreparedSplit(out, "validation", "data.validation")) > 0


def test_rebuild_is_a_no_op_and_a_fresh_build_gives_the_same_bytes(
    built: tuple[Path, dict], tmp_path: Path
) -> None:
    out, manifest = built
    stamp = (out / "train-00000.tar").stat().st_mtime_ns
    assert build(out) == manifest
    assert (out / "train-00000.tar").stat().st_mtime_ns == stamp
    fresh = build(tmp_path)
    assert fresh["splits"] == manifest["splits"] and fresh["tokenizer"] == manifest["tokenizer"]


def test_a_build_stamped_under_another_python_is_used_and_a_changed_input_is_not(
    built: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, manifest = built
    stamp = json.loads((out / STAMP).read_text())
    stamp["built_with_python"] = "3.12.9 (main) [GCC 13]"  # as carried from a machine with another Python
    carried = tmp_path / "carried"
    shutil.copytree(out, carried)
    (carried / STAMP).write_text(json.dumps(stamp))
    with monkeypatch.context() as m:
        m.setattr(demo_module.sys, "version", "3.12.9 (main) [GCC 13]")
        m.setattr(demo_module, "_build", lambda *args: pytest.fail("rebuilt a finished demo"))
        assert build(carried) == manifest  # smoke can run from a carried data/demo
    params = dict(stamp["params"], vocab_size=stamp["params"]["vocab_size"] + 1)
    assert finished_demo(carried, params) is None  # a tokenizer parameter changed: not this build
    assert finished_demo(carried, dict(stamp["params"], version=-1)) is None  # Loom's data format changed
    with open(carried / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "an edited corpus"}) + "\n")
    assert finished_demo(carried, stamp["params"]) is None


def test_half_built_or_edited_directories_are_rebuilt(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = built
    params = json.loads((out / STAMP).read_text())["params"]
    assert finished_demo(out, params) == manifest
    assert finished_demo(out, {**params, "vocab_size": 500}) is None
    assert finished_demo(tmp_path) is None  # nothing there
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "validation-00000.tar").write_bytes(b"")
    assert finished_demo(copy) is None
    assert build(copy)["splits"]["validation"] == manifest["splits"]["validation"]


def test_round_trip_on_the_bundled_corpus_is_exact(demo_data: Path) -> None:
    tokenizer = Tokenizer(demo_data / "tokenizer.model")
    lines = (demo_data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) > 5000 and any("\n    " in t for t in texts)  # indentation and newlines are present
    ids = tokenizer.encode_batch(texts, num_threads=2)
    assert all(tokenizer.unk_id not in doc for doc in ids)
    assert [tokenizer.decode(doc) for doc in ids] == texts


def test_prose_filter() -> None:
    assert is_prose("Return the number of items in the container.")
    assert not is_prose("-self")
    assert not is_prose(">>> f(b'\\x00\\x01')\n1234\n>>> f(b'\\xff')\n255")
    assert not is_prose("Это документ на русском языке, не английском.")


def test_whole_stdlib_collection() -> None:
    docs = collect_documents()
    assert 1_000_000 < sum(len(d) for d in docs) < 20_000_000
    assert len(set(docs)) == len(docs) and all(is_prose(d) for d in docs)
    assert any(d.startswith('The "if" statement') for d in docs)  # help() topics are included


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra", ["notes.txt", "train-00007.tar", "corpus.jsonl.tmp"])
def test_a_rebuild_never_deletes_a_file_the_demo_did_not_write(
    built: tuple[Path, dict], tmp_path: Path, extra: str
) -> None:
    out, _ = built
    copy = copy_of(out, tmp_path / "copy")
    (copy / "validation-00000.tar").write_bytes(b"")  # damaged: a rebuild is due
    (copy / extra).write_text("the user's own file\n")
    before = files(tmp_path)
    with pytest.raises(ConfigError, match=f"holds '{extra}'.*--overwrite"):
        build(copy)
    assert files(tmp_path) == before
    rebuilt = build_demo_data(copy, 400, num_sentinels=8, val_fraction=0.2, seq_len=32, num_threads=1,
                              modules=MODULES, shard_samples=256, overwrite=True)  # fmt: skip
    assert (
        rebuilt["splits"] == build(out)["splits"]
        and files(copy)["corpus.jsonl"] == files(out)["corpus.jsonl"]
    )
    assert not (copy / extra).exists() and not [p for p in tmp_path.iterdir() if p.name != "copy"]


def test_an_interrupted_build_leaves_the_folder_as_it_was(
    built: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = built
    copy = copy_of(out, tmp_path / "copy")
    (copy / "validation-00000.tar").write_bytes(b"")
    before = files(tmp_path)

    def interrupted(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "write_prepared", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(copy)
    assert files(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["copy"]
