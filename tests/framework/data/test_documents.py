"""Reading inputs: text and JSONL, plain/.gz/.zst, and one-line errors naming the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from framework.config.errors import ConfigError
from framework.data.documents import expand_inputs, is_validation, iter_documents

TEXTS = ["first document\n  with indentation", "second: naïve ∑ 🐍", "third\ttabs\r\n"]


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t}) + "\n" for t in texts).encode()


def texts_of(path: Path, field: str = "text") -> list[str]:
    return [doc.text for doc, _ in iter_documents([path], field)]


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_jsonl_in_every_compression_loses_nothing(tmp_path: Path, suffix: str) -> None:
    data = jsonl_bytes(TEXTS) + b"\n"  # a blank line is skipped, not a document
    compress = {"": bytes, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[suffix]
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(data))
    assert texts_of(path) == TEXTS


def test_plain_text_is_one_document_per_line_and_fields_are_configurable(tmp_path: Path) -> None:
    text = tmp_path / "lines.txt.gz"
    text.write_bytes(gzip.compress(b"one line\n\ntwo line\r\n"))
    assert texts_of(text) == ["one line", "two line"]
    other = tmp_path / "c.jsonl"
    other.write_bytes(jsonl_bytes(TEXTS, field="content"))
    assert texts_of(other, "content") == TEXTS


def error_of(path: Path, field: str = "text") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        texts_of(path, field)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return info.value


def test_bad_inputs_are_one_line_errors_naming_file_and_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert "is empty" in str(error_of(empty))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n\n")
    assert "no documents" in str(error_of(blank))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9 au lait\n")
    assert f"{latin}:2" in str(error_of(latin)) and "UTF-8" in str(error_of(latin))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(jsonl_bytes(TEXTS) + b'{"text": "unterminated\n')
    assert f"{broken}:4" in str(error_of(broken)) and "JSON" in str(error_of(broken))
    assert "line 1 has no string field 'body'" in str(error_of(broken, "body"))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(jsonl_bytes(TEXTS * 50))[:-30])
    assert "decompress" in str(error_of(truncated))
    with pytest.raises(ConfigError, match="file not found"):
        texts_of(tmp_path / "absent.jsonl")


def test_folders_expand_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.txt", "b.txt", "c.txt"]
    with pytest.raises(ConfigError, match="no input files"):
        expand_inputs([])


def test_split_depends_on_the_text_only() -> None:
    docs = [f"document number {i} about things" for i in range(2000)]
    val = [d for d in docs if is_validation(d, 0.05)]
    assert 60 < len(val) < 140
    assert [d for d in reversed(docs) if is_validation(d, 0.05)] == val[::-1]
    assert not any(is_validation(d, 0.0) for d in docs)


def test_more_malformed_inputs_are_one_line_errors(tmp_path: Path) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(jsonl_bytes(TEXTS) + b"[" * 100_000 + b"\n")  # deeper than the JSON parser's stack
    assert f"{deep}:4" in str(error_of(deep)) and "JSON" in str(error_of(deep))
    compressed = zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS * 2000))
    cut = tmp_path / "cut.jsonl.zst"  # zstandard's stream reader would end quietly, losing the rest
    cut.write_bytes(compressed[: len(compressed) // 2])
    assert "decompress" in str(error_of(cut)) and "truncated" in str(error_of(cut))
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(compressed + b"\x00" * 64)
    assert "decompress" in str(error_of(garbage))
    frames = tmp_path / "frames.jsonl.zst"  # several frames, as pzstd and concatenation write them
    frames.write_bytes(compressed + zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS)))
    assert texts_of(frames) == TEXTS * 2001
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_bytes(b"plain text, not gzip\n")
    assert "decompress" in str(error_of(not_gzip))


def test_a_missing_input_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine\n")
    with pytest.raises(ConfigError, match="absent.txt.*file not found") as info:
        expand_inputs([tmp_path / "a.txt", tmp_path / "absent.txt"])
    assert info.value.key == "input"
