"""Raw documents from text, JSONL (plain, .gz or .zst), Parquet and Arrow files, and the train/validation split.

Input formats (by file name, after stripping .gz / .zst):
    *.jsonl / *.json   one JSON object per line; the document is its `text_field` (default "text")
    *.parquet          the `text_field` column, read one record batch at a time (pyarrow; streaming)
    *.arrow            Arrow IPC (stream or file format), e.g. the shards of a Hugging Face `datasets`
                       `save_to_disk` folder: passing that folder takes its *.arrow files in the order its
                       state.json lists them
    anything else      plain text: every non-empty line is one document (use JSONL for multi-line documents)
Blank lines (and empty or all-whitespace texts) are skipped in all. Every problem (missing or empty file, invalid UTF-8, a broken JSON line, a missing
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
    if path.suffix in COLUMNAR:
        yield from _columnar_documents(path, text_field)
        return
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


COLUMNAR = (".parquet", ".arrow")


def _record_batches(path: Path, text_field: str) -> tuple[Iterator[Any], int]:
    """(record batches holding the `text_field` column, rows in the file) of a Parquet or Arrow IPC file."""
    import pyarrow as pa  # optional: needed for Parquet / Arrow inputs only

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            _require_column(pf.schema_arrow.names, path, text_field)
            return pf.iter_batches(batch_size=1024, columns=[text_field]), pf.metadata.num_rows
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # not the file format: HF datasets writes the stream format
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
            batches = iter(reader)
        _require_column(reader.schema.names, path, text_field)
        return batches, -1
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(str(path), "input", str(path), f"is not a readable {path.suffix[1:]} file ({error})",
                          "re-export it, or pass JSONL") from None  # fmt: skip


def _require_column(names: Sequence[str], path: Path, text_field: str) -> None:
    if text_field not in names:
        raise ConfigError(
            str(path), "text_field", text_field, f"{path.name} has no column '{text_field}' (it has {', '.join(names)})",
            "pass --text-field with the name of the column that holds the text",
        )  # fmt: skip


def _columnar_documents(path: Path, text_field: str) -> Iterator[tuple[Document, int]]:
    """Documents of a Parquet / Arrow file, batch by batch; the byte position is the file size times the fraction
    of rows read (exact at the end), which is what the progress bar needs."""
    batches, total_rows = _record_batches(path, text_field)
    size, row, found = path.stat().st_size, 0, False
    for batch in batches:
        texts = batch.column(batch.schema.get_field_index(text_field)).to_pylist()
        for text in texts:
            row += 1
            if not isinstance(text, str):
                raise ConfigError(f"{path}:row {row}", "text_field", text_field,
                                  f"row {row} of column '{text_field}' is {type(text).__name__}, not a string",
                                  "drop or fill those rows, or pass --text-field naming a string column")  # fmt: skip
            if text.strip():
                found = True
                yield (
                    Document(text, str(path), row),
                    size * row // max(total_rows, row) if total_rows > 0 else 0,
                )
    if not found:
        raise ConfigError(str(path), "input", str(path), "holds no documents", "remove it from the inputs")


def hf_dataset_files(folder: Path) -> list[Path] | None:
    """The *.arrow shards of a Hugging Face `datasets` save_to_disk folder (state.json lists them), else None."""
    state = folder / "state.json"
    if not (state.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(str(state), "input", str(folder), f"state.json is not a datasets state ({error})",
                          "re-save the dataset with save_to_disk") from None  # fmt: skip
    return files


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
            arrow = hf_dataset_files(item)  # a datasets folder: its shards, not its JSON metadata
            paths.extend(arrow if arrow is not None else sorted(
                p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")))  # fmt: skip
        else:
            paths.append(item)
    if not paths:
        raise ConfigError(
            None, "inputs", list(map(str, inputs)), "no input files", "name text or JSONL files"
        )
    return paths
