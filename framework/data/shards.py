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
import json
import mmap
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset

from framework.config.errors import ConfigError

FORMAT = "loom-prepared"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
STARTS_DTYPE = np.dtype("<i4")
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
    """The manifest of prepared dataset `root`; `key` is the recipe key that named it (for errors)."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise ConfigError(None, key, str(root), "no such prepared dataset folder", PREPARE_FIX)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        rule = "has no manifest.json (not prepared, or `loom data prepare` did not finish)"
        raise ConfigError(None, key, str(root), rule, PREPARE_FIX) from None
    except (OSError, ValueError) as error:
        raise ConfigError(str(path), key, str(root), f"unreadable manifest ({error})", PREPARE_FIX) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        rule = f"not a {FORMAT} v{VERSION} manifest"
        raise ConfigError(str(path), key, str(root), rule, PREPARE_FIX)
    return manifest


class PreparedSplit:
    """Random access to the samples of one split of a prepared dataset, viewed at `seq_len`.

    `seq_len` must divide the prepared seq_len: each prepared sample then yields prepared // seq_len samples of
    seq_len + 1 tokens (overlapping by one, like the prepared ones), so every token is still used exactly once.
    Files are memory-mapped on first read in each process (DataLoader workers open their own maps).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        key: str,
        seq_len: int | None = None,
        verify: Literal["size", "sha256"] = "size",
    ) -> None:
        self.root, self.split, self.key = Path(root), split, key
        self.manifest = read_manifest(root, key)
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.prepared_seq_len: int = self.manifest["seq_len"]
        self.seq_len = seq_len or self.prepared_seq_len
        self.pieces = _pieces(self.prepared_seq_len, self.seq_len, key, root)
        self.shards = self.manifest["splits"][split]["shards"]
        for shard in self.shards:
            _check_shard(self.root, shard, verify, key)
        self.index = [np.load(self.root / f"{s['name']}.idx", allow_pickle=False) for s in self.shards]
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
        tokens, starts = self._read(prepared)
        lo = piece * self.seq_len
        tokens = tokens[lo : lo + self.seq_len + 1]
        starts = starts[(starts > lo) & (starts <= lo + self.seq_len)] - lo
        # A document starting at p: positions p.. get the next id (eos belongs to the document it ends).
        return tokens, np.searchsorted(starts, np.arange(self.seq_len + 1), side="right")

    def _read(self, prepared: int) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = [self._map(shard) for shard in self.shards]
        shard = int(np.searchsorted(self.bounds, prepared, side="right")) - 1
        tokens_at, starts_at, count = self.index[shard][prepared - self.bounds[shard]]
        data = self._maps[shard]
        tokens = np.frombuffer(data, self.dtype, self.prepared_seq_len + 1, int(tokens_at))
        return tokens, np.frombuffer(data, STARTS_DTYPE, int(count), int(starts_at))

    def _map(self, shard: dict[str, Any]) -> mmap.mmap:
        with open(self.root / f"{shard['name']}.tar", "rb") as f:
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
