"""On resume, the recipe fields that decide what data comes next must equal the checkpoint's (docs/checkpoints.md).

A checkpoint's data position is a count of samples consumed in an order that is a seeded function of the data,
the sequence length and the batch size. Resumed with another value of any of these, the run would silently read
other data than the one it continues (a changed data.seq_len reuses the sample count at the new length; a changed
seed ignores the recipe's seed): so each change is one ConfigError naming the field, unless the user passes
`loom train --accept-data-change`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from framework.checkpoint.io import META
from framework.checkpoint.verify import read_meta_json
from framework.config.errors import ConfigError

DATA_FIELDS = (
    "data.train",
    "data.weights",
    "data.seq_len",
    "data.seed",
    "data.objective",
    "train.seed",
    "train.global_batch_size",
)
"""The fields whose change on resume changes what data (or random stream) comes next."""

_FIX = "resume with {key}: {old} as saved, or pass --accept-data-change to continue with the new value"


FINGERPRINT = "data_fingerprint"
"""meta.json key: the sha256 of each data.train folder's manifest.json when the checkpoint was saved."""


def data_fingerprint(train: Any) -> list[str | None]:
    """The sha256 of each prepared folder's manifest.json (None where there is none). The manifest lists every
    shard with its size and hash, so equal fingerprints mean the same samples, wherever the folder now lies
    (copied to node-local disk, say): a moved dataset is not a data change."""
    prints: list[str | None] = []
    for folder in _paths(train):
        try:
            prints.append(hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest())
        except OSError:
            prints.append(None)
    return prints


def check_same_data(checkpoint: Path, recipe: dict[str, Any]) -> None:
    """Refuse the first of DATA_FIELDS whose value in `recipe` (recipe_to_dict) differs from the one recorded
    in `checkpoint`'s meta.json. A checkpoint without a recorded recipe or data state has nothing to compare."""
    meta = read_meta_json(Path(checkpoint) / META)
    saved = meta.get("recipe")
    # No data state: no sample was drawn yet (an import's step 0, `loom convert --from`), so any data is the
    # start of this run's stream, not a change to it.
    if not isinstance(saved, dict) or meta.get("data_state") is None:
        return
    for key in DATA_FIELDS:
        found, old = _lookup(saved, key)
        _, new = _lookup(recipe, key)
        if key == "data.train" and _same_fingerprint(meta.get(FINGERPRINT), new):
            continue
        if found and not _same(key, old, new):
            rule = (
                f"differs from {old!r} in the checkpoint {checkpoint}: the resumed run would read other data"
            )
            raise ConfigError(None, key, new, rule, _FIX.format(key=key, old=_yaml(old)))


def _same_fingerprint(saved: Any, train: Any) -> bool:
    if not isinstance(saved, list) or None in saved:
        return False
    return saved == data_fingerprint(train)


def _lookup(recipe: dict[str, Any], key: str) -> tuple[bool, Any]:
    section, name = key.split(".")
    values = recipe.get(section)
    if not isinstance(values, dict) or name not in values:
        return False, None
    return True, values[name]


def _same(key: str, old: Any, new: Any) -> bool:
    if key != "data.train":
        return old == new
    # Paths: the same text, or the same folder (a relative path saved from this working directory)
    olds, news = _paths(old), _paths(new)
    return len(olds) == len(news) and all(_same_path(a, b) for a, b in zip(olds, news, strict=True))


def _paths(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value)
