"""Prepared datasets on disk: packed samples in webdataset tar shards, one index per shard, and a manifest.

A prepared directory (written by `loom data prepare`, framework.data.prepare):
    manifest.json            written last, atomically: it exists only when preparation finished, and it lists
                             only shards that were complete (each shard is written to a temp name, then renamed)
    train-00000.tar ...      webdataset shards. Sample k of a split is the member pair
                               {k:010d}.tokens  sample_len = seq_len + 1 little-endian ids (dtype in the manifest)
                               {k:010d}.starts  little-endian int32 positions in 1..seq_len where a document starts
    train-00000.idx ...      numpy .npy int64 [samples, 3]: byte offsets of the two members' data in the tar, and
                             the number of starts, so a sample is read by index with two slices of a memory map
    validation-00000.tar/.idx  the held-out split, same layout
Sample k holds stream tokens [k * seq_len, (k + 1) * seq_len + 1): consecutive samples share one token, so the
first seq_len tokens of the samples partition the stream (each token is an input exactly once per epoch, and with
the causal shift each token after the first is a label exactly once). The last sample is padded with pad_id.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from framework.config.errors import ConfigError
from framework.outputs import read_json_file

FORMAT = "loom-prepared"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
STARTS_DTYPE = np.dtype("<i4")
INDEX_DTYPE = np.dtype("<i8")
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
PREPARE_FIX = "run `loom data prepare INPUTS --tokenizer MODEL --seq-len N --out DIR` (or `make data`)"


def token_dtype(vocab_size: int) -> str:
    """The narrowest supported dtype name that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def shard_name(split: str, number: int) -> str:
    """`train`, 3 -> `train-00003` (the .tar and .idx share it)."""
    return f"{split}-{number:05d}"


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as the manifest lists them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_shard(
    out: Path, name: str, first_index: int, tokens: np.ndarray, starts: list[np.ndarray]
) -> dict[str, Any]:
    """Write samples tokens [n, sample_len] (with their document starts) as shard `name`; return its record.

    Both files are written under temporary names and renamed when complete, so a crash leaves at most a *.tmp.
    """
    # Imported here: only `loom data prepare` writes shards; training reads them with tarfile offsets and mmap,
    # so the run path works where webdataset (and its braceexpand) is not installed, as on a bare GPU node.
    import webdataset

    tar_tmp, idx_tmp = out / f"{name}.tar.tmp", out / f"{name}.idx.tmp"
    with open(tar_tmp, "wb") as f:
        # mtime and owner fixed: the same samples always give the same bytes.
        writer = webdataset.TarWriter(f, encoder=False, mtime=0, user="loom", group="loom")
        for row, (sample, doc_starts) in enumerate(zip(tokens, starts)):
            key = f"{first_index + row:010d}"
            writer.write({"__key__": key, "tokens": sample.tobytes(), "starts": doc_starts.tobytes()})
        writer.close()
    with open(idx_tmp, "wb") as f:
        np.save(f, _index_of(tar_tmp, starts), allow_pickle=False)
    record = {"name": name, "samples": len(tokens), "tar": file_record(tar_tmp), "idx": file_record(idx_tmp)}
    idx_tmp.replace(out / f"{name}.idx")
    tar_tmp.replace(out / f"{name}.tar")
    return record


def _index_of(tar_path: Path, starts: list[np.ndarray]) -> np.ndarray:
    # Offsets come from reading the finished archive back with tarfile, not from assumptions about header sizes.
    with tarfile.open(tar_path) as tar:
        offsets = [member.offset_data for member in tar]
    index = np.empty((len(starts), 3), dtype=np.int64)
    index[:, 0] = offsets[1::2]  # members are written sorted by name: .starts, then .tokens
    index[:, 1] = offsets[0::2]
    index[:, 2] = [len(s) for s in starts]
    return index


def read_manifest(root: str | Path, key: str) -> dict[str, Any]:
    """The manifest of prepared dataset `root`; `key` is the recipe key that named it (for errors). A missing,
    malformed or incomplete manifest is one ConfigError naming the file."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ConfigError(None, key, str(root), "no such prepared dataset folder", PREPARE_FIX)
    if not path.is_file():
        rule = "has no manifest.json (not prepared, or `loom data prepare` did not finish)"
        raise ConfigError(None, key, str(root), rule, PREPARE_FIX)
    try:
        manifest = read_json_file(path, "the prepared dataset's manifest", key=key)
    except ConfigError as error:  # name the file in full (a long path as the value would be shortened)
        raise ConfigError(str(path), key, str(root), error.rule, PREPARE_FIX) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        rule = f"not a {FORMAT} v{VERSION} manifest"
        raise ConfigError(str(path), key, str(root), rule, PREPARE_FIX)
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ConfigError(str(path), key, str(root), f"malformed manifest: {problem}", PREPARE_FIX)
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the fields readers rely on (None: nothing), so a hand-edited or damaged manifest is
    refused here rather than failing later with a KeyError or TypeError."""
    if manifest.get("dtype") not in DTYPES:
        return f"dtype must be one of {sorted(DTYPES)}"
    if not _is_int(manifest.get("seq_len"), 1):
        return "seq_len must be a positive integer"
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("sha256"), str):
        return "tokenizer.sha256 is missing"
    if not _is_int(tokenizer.get("vocab_size"), 1):
        return "tokenizer.vocab_size must be a positive integer"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "splits must be a mapping"
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            return f"splits.{split}.shards must be a list"
        for number, shard in enumerate(shards):
            problem = _shard_problem(shard)
            if problem is not None:
                return f"splits.{split}.shards[{number}] {problem}"
    return None


def _shard_problem(shard: Any) -> str | None:
    if not isinstance(shard, dict):
        return "must be a mapping"
    # A plain file name: a manifest must not point readers at files outside the dataset's folder.
    if not isinstance(shard.get("name"), str) or not SHARD_NAME.fullmatch(shard["name"]):
        return "name must be a plain file name (letters, digits, '-', '_')"
    if not _is_int(shard.get("samples"), 0):
        return "samples must be a non-negative integer"
    for suffix in ("tar", "idx"):
        record = shard.get(suffix)
        if not isinstance(record, dict) or not _is_int(record.get("bytes"), 0):
            return f"{suffix}.bytes must be a non-negative integer"
        if not isinstance(record.get("sha256"), str):
            return f"{suffix}.sha256 is missing"
    return None


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_index(path: Path, shard: dict[str, Any], sample_bytes: int, max_starts: int, key: str) -> np.ndarray:
    """The index of shard `shard` (its `.idx` file at `path`), checked against the shard: int64 [samples, 3]
    whose offsets all lie inside the `.tar` and whose start counts fit a sample. A file that is not such an
    array (truncated, edited, a pickle) is one ConfigError naming it, never an error deep in a reader."""

    def bad(rule: str) -> ConfigError:
        return ConfigError(str(path), key, str(path.parent), rule, PREPARE_FIX)

    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise bad(f"not a readable .npy index ({type(error).__name__}: {error})") from None
    samples = shard["samples"]
    if not isinstance(index, np.ndarray) or index.dtype != INDEX_DTYPE or index.shape != (samples, 3):
        found = f"{index.dtype} {list(index.shape)}" if isinstance(index, np.ndarray) else "not one array"
        raise bad(f"index must be int64 [{samples}, 3] (the manifest's sample count), found {found}")
    if samples == 0:
        return index
    tokens_at, starts_at, counts = index[:, 0], index[:, 1], index[:, 2]
    tar_bytes = shard["tar"]["bytes"]
    if (
        index.min() < 0
        or (tokens_at + sample_bytes).max() > tar_bytes
        or (starts_at + counts * STARTS_DTYPE.itemsize).max() > tar_bytes
        or counts.max() > max_starts
    ):
        raise bad(f"index points outside {shard['name']}.tar ({tar_bytes} bytes) or past a sample (corrupt)")
    return index


class PreparedSplit:
    """Random access to the samples of one split of a prepared dataset, viewed at `seq_len`.

    `seq_len` must divide the prepared seq_len: each prepared sample then yields prepared // seq_len samples of
    seq_len + 1 tokens (overlapping by one, like the prepared ones), so every token is still used exactly once.
    Files are memory-mapped on first read in each process (DataLoader workers open their own maps).

    Checks (docs/data.md, "Verification"): at open, every shard's size against the manifest (and, with
    `verify="sha256"`, its sha256) and every index's shape and offsets; at each read, the sample's token ids
    against `vocab_size` (default: the manifest's tokenizer) and its document starts. A failure is a ConfigError
    naming the file (and the sample).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        key: str,
        seq_len: int | None = None,
        verify: Literal["size", "sha256"] = "size",
        vocab_size: int | None = None,
    ) -> None:
        self.root, self.split, self.key = Path(root), split, key
        self.manifest = read_manifest(root, key)
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.prepared_seq_len: int = self.manifest["seq_len"]
        self.seq_len = seq_len or self.prepared_seq_len
        self.vocab_size: int = vocab_size or self.manifest["tokenizer"]["vocab_size"]
        self.pieces = _pieces(self.prepared_seq_len, self.seq_len, key, root)
        if split not in self.manifest["splits"]:
            rule = f"its manifest has no '{split}' split"
            raise ConfigError(str(self.root / MANIFEST), key, str(root), rule, PREPARE_FIX)
        self.shards = self.manifest["splits"][split]["shards"]
        for shard in self.shards:
            _check_shard(self.root, shard, verify, key)
        sample_bytes = (self.prepared_seq_len + 1) * self.dtype.itemsize
        self.index = [
            read_index(self.root / f"{s['name']}.idx", s, sample_bytes, self.prepared_seq_len, key)
            for s in self.shards
        ]
        self.bounds = np.cumsum([0] + [s["samples"] for s in self.shards])
        self._maps: list[mmap.mmap] | None = None

    def __len__(self) -> int:
        return int(self.bounds[-1]) * self.pieces

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not cross process boundaries; each DataLoader worker maps the files itself.
        return {**self.__dict__, "_maps": None}

    def sample(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [seq_len + 1], document ids [seq_len + 1] counted from 0) of sample `number`."""
        prepared, piece = divmod(number, self.pieces)
        shard, tokens, starts = self._read(prepared)
        lo = piece * self.seq_len
        tokens = tokens[lo : lo + self.seq_len + 1]
        self._check_sample(shard, prepared, tokens, starts)
        starts = starts[(starts > lo) & (starts <= lo + self.seq_len)] - lo
        # A document starting at p: positions p.. get the next id (eos belongs to the document it ends).
        return tokens, np.searchsorted(starts, np.arange(self.seq_len + 1), side="right")

    def _read(self, prepared: int) -> tuple[int, np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = [self._map(shard) for shard in self.shards]
        shard = int(np.searchsorted(self.bounds, prepared, side="right")) - 1
        tokens_at, starts_at, count = self.index[shard][prepared - self.bounds[shard]]
        data = self._maps[shard]
        tokens = np.frombuffer(data, self.dtype, self.prepared_seq_len + 1, int(tokens_at))
        return shard, tokens, np.frombuffer(data, STARTS_DTYPE, int(count), int(starts_at))

    def _check_sample(self, shard: int, prepared: int, tokens: np.ndarray, starts: np.ndarray) -> None:
        # Cheap (one max over the tokens returned, a few comparisons; ~3 us a sample, docs/data.md): a corrupt
        # shard read with verify=size would otherwise reach the embedding as an out-of-range index, or give
        # wrong document masks.
        top = tokens.max()
        if top >= self.vocab_size:
            rule = f"holds token id {top}, not below the vocabulary's {self.vocab_size} (corrupt shard)"
            raise self._corrupt(shard, prepared, rule)
        count = len(starts)
        if count and (
            starts[0] < 1
            or starts[-1] > self.prepared_seq_len
            or (count > 1 and (starts[1:] <= starts[:-1]).any())
        ):
            raise self._corrupt(shard, prepared, "has document starts out of order or range (corrupt shard)")

    def _corrupt(self, shard: int, prepared: int, rule: str) -> ConfigError:
        path = self.root / f"{self.shards[shard]['name']}.tar"
        member = f"{prepared:010d}.tokens"
        return ConfigError(
            str(path), self.key, str(self.root), f"sample {prepared} ({member}) {rule}", PREPARE_FIX
        )

    def _map(self, shard: dict[str, Any]) -> mmap.mmap:
        path = self.root / f"{shard['name']}.tar"
        with open(path, "rb") as f:
            # The index was checked against the manifest's size; a file replaced since must not be read past.
            size = os.fstat(f.fileno()).st_size
            if size != shard["tar"]["bytes"]:
                rule = f"has {size} bytes, the manifest says {shard['tar']['bytes']} (replaced while in use)"
                raise ConfigError(str(path), self.key, str(self.root), rule, PREPARE_FIX)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _pieces(prepared: int, seq_len: int, key: str, root: str | Path) -> int:
    if prepared % seq_len != 0:
        raise ConfigError(
            None,
            "data.seq_len",
            seq_len,
            f"must divide the seq_len {prepared} that {key}={root} was prepared with",
            f"use data.seq_len={prepared} (or a divisor), or prepare again with --seq-len {seq_len}",
        )
    return prepared // seq_len


def _check_shard(root: Path, shard: dict[str, Any], verify: str, key: str) -> None:
    for suffix in ("tar", "idx"):
        path = root / f"{shard['name']}.{suffix}"
        expected = shard[suffix]
        if not path.is_file():
            raise ConfigError(
                str(path), key, str(root), "a shard listed in the manifest is missing", PREPARE_FIX
            )
        size = path.stat().st_size
        if size != expected["bytes"]:
            rule = f"has {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
            raise ConfigError(str(path), key, str(root), rule, PREPARE_FIX)
        if verify == "sha256" and file_record(path)["sha256"] != expected["sha256"]:
            rule = "sha256 differs from the manifest's (corrupt or replaced)"
            raise ConfigError(str(path), key, str(root), rule, PREPARE_FIX)
