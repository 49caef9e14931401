"""Hugging Face tokenizers (`tokenizer.json`): the second backend of framework.data.tokenizer.Tokenizer, and
training a byte-level BPE with the `tokenizers` library (`loom data tokenizer --type bpe`).

What Llama-3, Qwen, GPT-2, Mistral-Nemo and most 2024-26 models ship: a `tokenizer.json` (byte-level BPE,
WordPiece or Unigram; the `tokenizers` library runs all of them) beside a `tokenizer_config.json` naming the
special tokens. `data.tokenizer` may name the tokenizer.json itself or the folder holding it. The special ids come
from tokenizer_config.json (bos_token, eos_token, pad_token, unk_token, mask_token; a string or an AddedToken
dict), else from special_tokens_map.json; the T5 sentinels are the `<extra_id_N>` tokens present. A tokenizer
without a pad token (Llama-3) has pad_id -1: `loom data prepare` then pads the one partial sample at the end of a
split with eos, and the objectives that need pad (span corruption) refuse it.

sha256 covers tokenizer.json and tokenizer_config.json (when present): the files that decide the ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from framework.config.errors import ConfigError
from framework.data.tokenizer import (
    BOS,
    EOS,
    MASK,
    PAD,
    Tokenizer,
    read_model,
    reserved_pieces,
    sentinel_piece,
)

TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "tokenizer_config.json"
SPECIAL_MAP_JSON = "special_tokens_map.json"
FILES = (TOKENIZER_JSON, CONFIG_JSON, SPECIAL_MAP_JSON)
"""The files an HF tokenizer folder is made of (what an import or export copies, when present)."""
HF_FIX = "pass a tokenizer.json (or the Hugging Face model folder holding it), or a sentencepiece .model file"


def is_hf_tokenizer(path: Path) -> bool:
    """Whether `path` names an HF tokenizer: a *.json file, or a folder with a tokenizer.json."""
    return path.suffix == ".json" or (path.is_dir() and (path / TOKENIZER_JSON).is_file())


def hf_files(path: Path) -> dict[str, Path]:
    """name -> path of the tokenizer files beside (or in) `path` that exist."""
    folder = path if path.is_dir() else path.parent
    found = {name: folder / name for name in FILES if (folder / name).is_file()}
    if not path.is_dir():
        found[TOKENIZER_JSON] = path
    return found


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(None, key, str(path), f"is not readable JSON ({error})", HF_FIX) from None
    if not isinstance(data, dict):
        raise ConfigError(None, key, str(path), "is not a JSON object", HF_FIX)
    return data


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from tokenizer.json, with the special ids of its tokenizer_config.json."""

    kind = "hf"

    def __init__(self, path: str | Path, key: str = "data.tokenizer") -> None:
        from tokenizers import Tokenizer as Backend

        self.path = Path(path)
        files = hf_files(self.path)
        data = read_model(files[TOKENIZER_JSON], key)
        try:
            self._tok = Backend.from_str(data.decode("utf-8"))
        except Exception as error:  # the Rust library's parse errors share no Python base class
            rule = f"is not a tokenizers tokenizer.json ({' '.join(str(error).split())[:200]})"
            raise ConfigError(None, key, str(files[TOKENIZER_JSON]), rule, HF_FIX) from None
        self._json = data.decode("utf-8")
        config = _read_json(files[CONFIG_JSON], key) if CONFIG_JSON in files else {}
        special = _read_json(files[SPECIAL_MAP_JSON], key) if SPECIAL_MAP_JSON in files else {}
        self.sha256 = _digest([data] + ([files[CONFIG_JSON].read_bytes()] if CONFIG_JSON in files else []))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (
            self._special(name, config, special) for name in ("pad", "eos", "bos", "unk")
        )
        mask = self._special("mask", config, special)
        self.mask_id: int | None = mask if mask >= 0 else None
        self.sentinel_ids: tuple[int, ...] = self._sentinels()

    def _special(self, name: str, config: dict[str, Any], special: dict[str, Any]) -> int:
        text = _token_text(config.get(f"{name}_token")) or _token_text(special.get(f"{name}_token"))
        index = self._tok.token_to_id(text) if text is not None else None
        return -1 if index is None else index

    def _sentinels(self) -> tuple[int, ...]:
        ids = []
        while (index := self._tok.token_to_id(sentinel_piece(len(ids)))) is not None:
            ids.append(index)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # the library parallelises a batch itself (its own thread pool); ids do not depend on it
        return _HFEncoder(self._tok).encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens (pad, bos, eos, ...) dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, index: int) -> str:
        return self._tok.id_to_token(int(index)) or ""

    def worker_state(self) -> tuple[str, Any]:
        return ("hf", self._json)


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())  # each file hashed by itself: no ambiguity at the joins
    return h.hexdigest()


class _HFEncoder:
    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


def encoder_from_json(text: str) -> _HFEncoder:
    """The encoder a `loom data prepare` worker process rebuilds from the tokenizer.json text."""
    from tokenizers import Tokenizer as Backend

    return _HFEncoder(Backend.from_str(text))


# -- training a byte-level BPE (`loom data tokenizer --type bpe`) ----------------------------------------------


def special_tokens(num_sentinels: int) -> list[str]:
    """Loom's special tokens, in id order: pad, eos, (no unk: byte-level BPE covers every byte), bos, mask, then
    the sentinels listed as the sentencepiece layout lists them (<extra_id_0> highest)."""
    sentinels = [sentinel_piece(i) for i in reversed(range(num_sentinels))]
    return [PAD, EOS, BOS, MASK, *sentinels]


def train_bpe(texts: Sequence[str], out: Path, vocab_size: int, num_sentinels: int) -> None:
    """Train a byte-level BPE (GPT-2 / Llama-3 style: bytes mapped to printable characters, no unknown token)
    on `texts` and write OUT/tokenizer.json and OUT/tokenizer_config.json into the folder `out` (new, empty)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = special_tokens(num_sentinels)
    if vocab_size <= len(specials) + 256:
        raise ConfigError(
            None, "--vocab-size", vocab_size, f"leaves no merges after {len(specials)} special tokens and 256 bytes",
            f"raise it above {len(specials) + 256} (at least {reserved_pieces(num_sentinels)} pieces)",
        )  # fmt: skip
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "eos_token": EOS, "bos_token": BOS,
              "mask_token": MASK, "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False}  # fmt: skip
    (out / CONFIG_JSON).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def train_bpe_on_files(
    inputs: Sequence[str | Path],
    out: str | Path,
    vocab_size: int,
    *,
    text_field: str = "text",
    val_fraction: float = 0.0,
    num_sentinels: int = 32,
    overwrite: bool = False,
) -> Tokenizer:
    """`loom data tokenizer --type bpe`: train_bpe on the documents of the inputs (validation documents, held out
    with the same `val_fraction` as `loom data prepare`, are skipped) into the new folder `out`, which appears
    whole (a temporary sibling renamed) or not at all. Returns the loaded tokenizer."""
    from framework.data.documents import expand_inputs
    from framework.data.tokenizer import training_texts
    from framework.outputs import atomic_dir, check_output

    paths = expand_inputs(inputs)
    out = check_output(out, inputs=[*inputs, *paths], overwrite=overwrite, key="--out")
    texts = training_texts(paths, text_field, val_fraction)
    with atomic_dir(out, "tokenizer", overwrite=overwrite) as tmp:
        train_bpe(texts, tmp, vocab_size, num_sentinels)
    return Tokenizer(out)
