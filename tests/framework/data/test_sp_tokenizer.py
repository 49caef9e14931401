"""The SentencePiece tokenizer: id layout, special tokens, byte fallback, deterministic training."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.config.errors import ConfigError
from framework.data.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_on_files

TINY_VOCAB, TINY_SENTINELS = 400, 8  # as trained by conftest.tiny_tokenizer


def test_special_id_layout(tiny_tokenizer: Tokenizer) -> None:
    tok = tiny_tokenizer
    assert tok.vocab_size == TINY_VOCAB
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert len(tok.sentinel_ids) == TINY_SENTINELS
    # T5 order: <extra_id_0> has the highest sentinel id, each next one the next lower id.
    assert list(tok.sentinel_ids) == list(range(4 + TINY_SENTINELS, 4, -1))
    assert [tok.id_to_piece(i) for i in tok.sentinel_ids[:2]] == ["<extra_id_0>", "<extra_id_1>"]
    assert tok.special_ids == {0, 1, 2, 3, 4, *tok.sentinel_ids}


def test_encode_decode_round_trip_with_byte_fallback(tiny_tokenizer: Tokenizer) -> None:
    # No normalisation: whitespace runs, tabs, newlines and CRLF survive exactly.
    for layout in ("  two leading", "a\tb\n\n    indented  ", "x\r\ny", " "):
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(layout)) == layout
    text = "Return a new list of the arguments."
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert not set(ids) & tiny_tokenizer.special_ids
    rare = "naïve ∑ 🐍"  # characters the tiny model never saw come out as bytes, not <unk>
    rare_ids = tiny_tokenizer.encode(rare)
    assert tiny_tokenizer.unk_id not in rare_ids
    assert tiny_tokenizer.decode(rare_ids) == rare
    assert tiny_tokenizer.encode_batch([text, rare], num_threads=2) == [ids, rare_ids]


def test_training_is_deterministic(tmp_path: Path, small_texts: list[str]) -> None:
    for model_type in ("bpe", "unigram"):
        a = train_tokenizer(
            small_texts,
            tmp_path / f"a-{model_type}.model",
            350,
            model_type=model_type,
            num_sentinels=4,
            num_threads=2,
        )
        b = train_tokenizer(
            small_texts,
            tmp_path / f"b-{model_type}.model",
            350,
            model_type=model_type,
            num_sentinels=4,
            num_threads=2,
        )
        assert a.sha256 == b.sha256
        assert len(a.sentinel_ids) == 4 and a.vocab_size == 350


def test_vocab_too_small_for_reserved_pieces(tmp_path: Path, small_texts: list[str]) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        train_tokenizer(small_texts, tmp_path / "x.model", 256 + 4 + 1 + 32)


def test_missing_or_corrupt_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer.*file not found"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01not a protobuf")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_an_existing_model_is_kept_unless_overwrite(tmp_path: Path, small_texts: list[str]) -> None:
    out = tmp_path / "tok.model"
    out.write_bytes(b"the user's file")
    with pytest.raises(ConfigError, match="already exists"):
        train_tokenizer(small_texts, out, 350, num_sentinels=4, num_threads=1)
    assert out.read_bytes() == b"the user's file"
    assert (
        train_tokenizer(small_texts, out, 350, num_sentinels=4, num_threads=1, overwrite=True).vocab_size
        == 350
    )
    assert [p.name for p in tmp_path.iterdir()] == ["tok.model"]  # no temporary file left


def test_a_folder_or_an_input_as_the_model_path_is_refused(tmp_path: Path, small_texts: list[str]) -> None:
    corpus = tmp_path / "in.txt"
    corpus.write_text("\n".join(small_texts[:50]) + "\n")
    before = corpus.read_bytes()
    with pytest.raises(ConfigError, match="is a folder"):
        train_tokenizer(small_texts, tmp_path, 350, num_sentinels=4, num_threads=1, overwrite=True)
    with pytest.raises(ConfigError, match="input"):
        train_tokenizer_on_files([corpus], corpus, 350, num_sentinels=4, num_threads=1, overwrite=True)
    assert corpus.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["in.txt"]
