"""SentencePiece tokenizers: training one with Loom's special tokens, and the wrapper the data layer uses.

Id layout of a model trained here (fixed, so objectives and recipes can rely on it):
    0 <pad>   1 </s> (eos)   2 <unk>   3 <s> (bos)   4 <mask>
    5 .. 4+n  the T5 sentinels <extra_id_{n-1}> .. <extra_id_0>: listed in reverse so that, as in T5, <extra_id_0>
              has the highest sentinel id and each next sentinel the next lower id
    then the 256 byte-fallback pieces <0x00>..<0xFF>, then the learned pieces.
<mask> and the sentinels are user-defined symbols (not control symbols): they decode to visible text, as T5's and
BERT's do, which keeps corrupted batches readable when debugging.

Normalisation is off (sentencepiece's "identity" rule, extra whitespace kept): decode(encode(text)) == text for
every text, newlines and indentation included (a newline, never seen inside a training line, becomes the byte
piece <0x0A>). sentencepiece's default nmt_nfkc rule would collapse whitespace and NFKC-fold characters, which
loses the layout of code and docstrings.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm

from framework.config.errors import ConfigError
from framework.data.documents import expand_inputs, is_validation, iter_documents
from framework.outputs import atomic_file, check_output

PAD, EOS, UNK, BOS, MASK = "<pad>", "</s>", "<unk>", "<s>", "<mask>"
DEFAULT_NUM_SENTINELS = 32
BUILD_FIX = "run `make data` to build the demo tokenizer, or `loom data tokenizer` to train one"


def sentinel_piece(index: int) -> str:
    """The T5 sentinel piece for noise span `index`."""
    return f"<extra_id_{index}>"


def reserved_pieces(num_sentinels: int) -> int:
    """Pieces a model trained here holds besides the learned ones (meta, mask, sentinels, 256 bytes)."""
    return 4 + 1 + num_sentinels + 256


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int = 4096,
    *,
    model_type: Literal["bpe", "unigram"] = "bpe",
    num_sentinels: int = DEFAULT_NUM_SENTINELS,
    num_threads: int = 2,
    input_sentence_size: int = 0,
    byte_fallback: bool = True,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model on `texts` (each line is one training sentence) and write it to `out_path`
    (through a temporary sibling and a rename; an existing file is refused unless `overwrite`).

    Deterministic for the same texts, arguments and sentencepiece version: no sampling unless
    `input_sentence_size` > 0 (then sentencepiece samples that many sentences with its fixed default seed), and
    a fixed `num_threads` (the unigram trainer's sums depend on how sentences are split between threads).
    Without `byte_fallback`, characters outside the learned pieces become <unk> (the round trip is then lossy).
    """
    out_path = check_model_out(out_path, (), overwrite)
    if vocab_size <= reserved_pieces(num_sentinels) - (0 if byte_fallback else 256):
        raise ConfigError(
            None, "vocab_size", vocab_size, "leaves no learned pieces after the reserved ones", "raise it"
        )
    model = io.BytesIO()
    try:
        _train(
            texts,
            model,
            vocab_size,
            model_type,
            num_sentinels,
            num_threads,
            input_sentence_size,
            byte_fallback,
        )
    except RuntimeError as error:
        # sentencepiece refuses e.g. a vocabulary larger than the text supports.
        rule = f"sentencepiece training failed: {error}".strip()
        raise ConfigError(
            None, "vocab_size", vocab_size, rule, "lower the vocab size or give more text"
        ) from None
    # sentencepiece wrote into memory (model_writer), so the only file is this one, renamed in when complete.
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        tmp.write_bytes(model.getvalue())
    return Tokenizer(out_path)


def check_model_out(out: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> Path:
    """Refuse an output model path that is a folder, an input, or (without `overwrite`) an existing file."""
    out = Path(out)
    if out.is_dir():
        rule = "is a folder; it names the .model file to write"
        raise ConfigError(
            "command line", "--out", str(out), rule, f"pass a file path, e.g. {out / 'tok.model'}"
        )
    return check_output(out, inputs=inputs, overwrite=overwrite, key="--out", want_dir=False)


def _train(
    texts: Iterable[str],
    model: io.BytesIO,
    vocab_size: int,
    model_type: str,
    num_sentinels: int,
    num_threads: int,
    input_sentence_size: int,
    byte_fallback: bool,
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=3,
        user_defined_symbols=[MASK] + [sentinel_piece(i) for i in reversed(range(num_sentinels))],
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        split_digits=True,
        num_threads=num_threads,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        minloglevel=2,
    )


def _lines(texts: Iterable[str]) -> Iterable[str]:
    # sentencepiece trains on sentences; the lines of a multi-line document are its natural sentences.
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


class Tokenizer:
    """The tokenizer interface the data layer uses, with the ids the objectives need. `Tokenizer(path)` loads the
    backend `path` names: a sentencepiece `.model` file (SentencePieceTokenizer), or a Hugging Face
    `tokenizer.json` or a folder holding one (framework.data.hf_tokenizer.HFTokenizer, the `tokenizers`
    library). Ids a tokenizer lacks are -1 (pad, bos, eos, unk) or None (mask); sentinels are the
    `<extra_id_N>` tokens it has, in order.

    Attributes of every backend: path, kind ("sentencepiece" | "hf"), sha256 (of the files that define the ids),
    vocab_size, pad_id, eos_id, bos_id, unk_id, mask_id, sentinel_ids."""

    kind: str
    path: Path
    sha256: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int
    unk_id: int
    mask_id: int | None
    sentinel_ids: tuple[int, ...]

    def __new__(cls, path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
        if cls is Tokenizer:  # dispatch on what the path names; subclasses construct themselves
            from framework.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer

            cls = HFTokenizer if is_hf_tokenizer(Path(path)) else SentencePieceTokenizer
        return super().__new__(cls)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never text: pad, eos, bos, unk, mask and the sentinels (ids < 0 mean 'disabled')."""
        ids = {self.pad_id, self.eos_id, self.bos_id, self.unk_id, self.mask_id, *self.sentinel_ids}
        return frozenset(i for i in ids if i is not None and i >= 0)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no bos/eos added); the result does not depend on `num_threads`."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        raise NotImplementedError

    def id_to_piece(self, index: int) -> str:
        """The piece (token) string of one id."""
        raise NotImplementedError

    def worker_state(self) -> tuple[str, Any]:
        """A picklable description a worker process rebuilds an encoder from (`encoder_from_state`)."""
        raise NotImplementedError


def encoder_from_state(state: tuple[str, Any]) -> Any:
    """An object with `encode_batch(texts) -> list[list[int]]`, rebuilt in a worker from `worker_state()`."""
    kind, payload = state
    if kind == "sentencepiece":
        return _SentencePieceEncoder(spm.SentencePieceProcessor(model_proto=payload))
    from framework.data.hf_tokenizer import encoder_from_json

    return encoder_from_json(payload)


class _SentencePieceEncoder:
    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp = sp

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model (the id layout of the module docstring when trained here)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, key: str = "data.tokenizer") -> None:
        self.path = Path(path)
        data = read_model(self.path, key)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as error:
            rule = f"not a sentencepiece model ({' '.join(str(error).split())})"
            raise ConfigError(None, key, str(path), rule, BUILD_FIX) from None
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.eos_id: int = self._sp.eos_id()
        self.bos_id: int = self._sp.bos_id()
        self.unk_id: int = self._sp.unk_id()
        self.mask_id: int | None = self._find(MASK)
        self.sentinel_ids: tuple[int, ...] = self._sentinels()

    def _find(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for unknown pieces, so confirm the round trip.
        index = self._sp.piece_to_id(piece)
        return index if self._sp.id_to_piece(index) == piece else None

    def _sentinels(self) -> tuple[int, ...]:
        ids = []
        while (index := self._find(sentinel_piece(len(ids)))) is not None:
            ids.append(index)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, encoded on `num_threads` threads (the result does not depend on it)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad/bos/eos are dropped, <mask> and sentinels are kept as their piece text."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, index: int) -> str:
        """The piece string of one id."""
        return self._sp.id_to_piece(int(index))

    def worker_state(self) -> tuple[str, Any]:
        return ("sentencepiece", self.path.read_bytes())


def read_model(path: Path, key: str = "data.tokenizer") -> bytes:
    """The bytes of a tokenizer model file; missing or unreadable is one ConfigError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(None, key, str(path), "file not found", BUILD_FIX) from None
    except IsADirectoryError:
        raise ConfigError(None, key, str(path), "is a folder, not a .model file", BUILD_FIX) from None
    except OSError as error:
        raise ConfigError(None, key, str(path), f"cannot read ({error.strerror})", BUILD_FIX) from None


def train_tokenizer_on_files(
    inputs: Sequence[str | Path],
    out_path: str | Path,
    vocab_size: int,
    *,
    text_field: str = "text",
    val_fraction: float = 0.0,
    overwrite: bool = False,
    **options: Any,
) -> Tokenizer:
    """`train_tokenizer` on the documents of text/JSONL files (framework.data.documents). Documents that
    `loom data prepare` holds out with the same `val_fraction` are skipped, so validation text stays unseen.
    `out_path` must not be (or lie inside) an input, checked before anything is read."""
    paths = expand_inputs(inputs)
    check_model_out(out_path, [*inputs, *paths], overwrite)
    texts = training_texts(paths, text_field, val_fraction)
    return train_tokenizer(texts, out_path, vocab_size, overwrite=overwrite, **options)


def training_texts(paths: Sequence[Path], text_field: str, val_fraction: float) -> list[str]:
    """The documents a tokenizer trains on: every input's, less those `loom data prepare` holds out with the
    same `val_fraction`. Read once up front, so a bad line raises its ConfigError here rather than from inside
    a trainer's native code."""
    return [
        doc.text for doc, _ in iter_documents(paths, text_field) if not is_validation(doc.text, val_fraction)
    ]
