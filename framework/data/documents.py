"""Raw documents from text and JSONL files (plain, .gz or .zst), and the train/validation split.

Input formats (by file name, after stripping .gz / .zst):
    *.jsonl / *.json   one JSON object per line; the document is its `text_field` (default "text")
    anything else      plain text: every non-empty line is one document (use JSONL for multi-line documents)
Blank lines are skipped in both. Every problem (missing or empty file, invalid UTF-8, a broken JSON line, a missing
or non-string text field) is a ConfigError naming the file and line, so nothing is silently dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from framework.config.errors import ConfigError

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Document:
    """One document with where it came from (for error messages)."""

    text: str
    path: str
    line: int


def is_validation(text: str, val_fraction: float) -> bool:
    """Held out when the first 8 bytes of the text's sha256 fall in the lowest `val_fraction` of the range: the
    split depends on the text only, never on file order, worker count or the other documents."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < int(val_fraction * 2**64)


def open_raw(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(the file on disk, a stream of its decompressed bytes); the first tells how far reading has got."""
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if path.suffix == ".gz":
        return raw, gzip.GzipFile(fileobj=raw)
    if path.suffix == ".zst":
        return raw, _ZstdReader(raw)
    return raw, raw


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. A file that ends inside a frame (truncated) is
    an EOFError, as in gzip: zstandard's own stream_reader ends quietly there, dropping the rest of the input."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard  # optional: needed for .zst inputs only

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new()
        self._in_frame = False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        size = min(len(buffer), len(self._out) - self._pos)
        buffer[:size] = self._out[self._pos : self._pos + size]
        self._pos += size
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            if self._frame.eof:  # a decompressobj decodes one frame; the next frame needs a new one
                self._frame = self._new()
            parts.append(self._frame.decompress(chunk))
            self._in_frame = not self._frame.eof
            chunk = self._frame.unused_data if self._frame.eof else b""
        return b"".join(parts)


def is_jsonl(path: Path) -> bool:
    """JSONL when the name without its compression suffix ends in .jsonl or .json."""
    stem = path.with_suffix("") if path.suffix in (".gz", ".zst") else path
    return stem.suffix in (".jsonl", ".json")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[tuple[Document, int]]:
    """(document, bytes of the file read so far) for every document of one input file."""
    path = Path(path)
    _check_file(path)
    jsonl = is_jsonl(path)
    found = False
    raw, stream = open_raw(path)
    with raw:
        for number, line in enumerate(_lines(stream, path), start=1):
            if not line.strip():
                continue
            text = _decode(line, path, number)
            found = True
            doc = _json_text(text, path, number, text_field) if jsonl else text.rstrip("\r\n")
            yield Document(doc, str(path), number), raw.tell()
    if not found:
        raise ConfigError(str(path), "input", str(path), "holds no documents", "remove it from the inputs")


def _lines(stream: BinaryIO, path: Path) -> Iterator[bytes]:
    # Decompression errors surface while reading; name the file instead of showing a traceback.
    try:
        yield from io.BufferedReader(stream, 1 << 20)
    except Exception as error:
        # zstandard.ZstdError derives from Exception only, and zstandard is imported only for .zst inputs.
        if not isinstance(error, OSError | EOFError | ValueError) and type(error).__name__ != "ZstdError":
            raise
        raise ConfigError(
            str(path), "input", str(path), f"cannot decompress ({error})", "re-download or recompress it"
        ) from None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(None, "input", str(path), "file not found", "check the path of the input")
    if path.stat().st_size == 0:
        raise ConfigError(str(path), "input", str(path), "is empty", "remove it from the inputs")


def _decode(line: bytes, path: Path, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}:{number}",
            "input",
            line[max(0, error.start - 20) : error.end + 20],
            f"invalid UTF-8 at byte {error.start} of line {number}",
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _json_text(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the parser's stack
        raise ConfigError(
            f"{path}:{number}", "input", line[:60], f"broken JSON on line {number} ({error})", "fix that line"
        ) from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(
            f"{path}:{number}",
            "text_field",
            text_field,
            f"line {number} has no string field '{text_field}'",
            "pass --text-field with the name of the field that holds the text",
        )
    return text


def iter_documents(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[tuple[Document, int]]:
    """Documents of every input in the given order, with the bytes read so far over all inputs."""
    done = 0
    for path in paths:
        size = 0
        for doc, size in read_documents(path, text_field):
            yield doc, done + size
        done += Path(path).stat().st_size


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files in a fixed order: files as given, folders replaced by their files in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.exists():  # the path as the file too: a long value is shortened in the message
            raise ConfigError(str(item), "input", str(item), "file not found", "check the path of the input")
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            paths.append(item)
    if not paths:
        raise ConfigError(
            None, "inputs", list(map(str, inputs)), "no input files", "name text or JSONL files"
        )
    return paths
