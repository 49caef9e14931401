"""Hugging Face tokenizers (tokenizer.json) and columnar inputs (Parquet, Arrow, `datasets` save_to_disk) in the
data layer, against the libraries themselves: `tokenizers` / `transformers.AutoTokenizer` for the ids, pyarrow and
`datasets` for the files, and the JSONL path for the shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from framework.config.errors import ConfigError
from framework.data.hf_tokenizer import HFTokenizer
from framework.data.prepare import prepare
from framework.data.shards import MANIFEST, PreparedSplit
from framework.data.tokenizer import SentencePieceTokenizer, Tokenizer
from launcher.cli import EXIT_USER_ERROR, main

SEQ = 32
TEXTS = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n  def f(x):\n      return x * {i}"
         for i in range(120)]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


@pytest.fixture(scope="module")
def bpe(corpus: Path, tmp_path_factory) -> Path:
    """A byte-level BPE trained by `loom data tokenizer --type bpe` (the tokenizers library's trainer)."""
    out = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["data", "tokenizer", str(corpus), "--type", "bpe", "--out", str(out), "--vocab-size", "400",
                 "--sentinels", "4"]) == 0  # fmt: skip
    return out


def test_bpe_tokenizer_ids_match_the_libraries(bpe: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    tok = Tokenizer(bpe)
    assert isinstance(tok, HFTokenizer) and isinstance(Tokenizer(bpe / "tokenizer.json"), HFTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, -1)
    assert len(tok.sentinel_ids) == 4 and tok.sentinel_ids[0] > tok.sentinel_ids[1]  # <extra_id_0> highest
    backend, auto = Backend.from_file(str(bpe / "tokenizer.json")), AutoTokenizer.from_pretrained(bpe)
    assert auto.eos_token_id == tok.eos_id and auto.pad_token_id == tok.pad_id
    for text in [*TEXTS[:5], "naïve café ☕ \t tabs", ""]:
        ids = tok.encode(text)
        assert (
            ids
            == backend.encode(text, add_special_tokens=False).ids
            == auto.encode(text, add_special_tokens=False)
        )
        assert tok.decode(ids) == text  # byte-level: lossless, whitespace included
    assert tok.encode_batch(TEXTS[:7]) == [tok.encode(t) for t in TEXTS[:7]]


def test_sentencepiece_models_still_load_as_before(demo_data: Path) -> None:
    tok = Tokenizer(demo_data / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer) and (tok.pad_id, tok.eos_id) == (0, 1)


def _stream(out: Path, split: str) -> np.ndarray:
    data = PreparedSplit(out, split, "data.train")
    return np.concatenate([data.sample(i)[0][:SEQ] for i in range(len(data))])


def test_prepare_with_bpe_is_byte_identical_for_any_worker_count(
    corpus: Path, bpe: Path, tmp_path: Path
) -> None:
    outs = [tmp_path / f"w{w}" for w in (0, 2)]
    for out, workers in zip(outs, (0, 2)):
        prepare([corpus], out, bpe, SEQ, val_fraction=0.1, workers=workers, progress=False)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    manifest = json.loads((outs[0] / MANIFEST).read_text())
    tok = Tokenizer(bpe)
    assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["dtype"] == "uint16"
    expected = [i for t in TEXTS if not _held_out(t) for i in [*tok.encode(t), tok.eos_id]]
    assert _stream(outs[0], "train")[: len(expected)].tolist() == expected


def _held_out(text: str) -> bool:
    from framework.data.documents import is_validation

    return is_validation(text, 0.1)


def test_a_vocabulary_above_65535_is_stored_in_32_bits(corpus: Path, bpe: Path, tmp_path: Path) -> None:
    """Llama-3's 128,256 tokens do not fit uint16: ids above 65,535 must come back unchanged."""
    from tokenizers import Tokenizer as Backend

    big = tmp_path / "big"
    big.mkdir()
    backend = Backend.from_file(str(bpe / "tokenizer.json"))
    backend.add_tokens([f"<tok{i}>" for i in range(70_000)])  # ids 400 .. 70,399
    backend.save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text((bpe / "tokenizer_config.json").read_text())
    texts = tmp_path / "high.jsonl"
    texts.write_text(
        "".join(json.dumps({"text": f"a <tok{69_990 + i}> b <tok{i}>"}) + "\n" for i in range(10))
    )
    out = tmp_path / "prepared"
    prepare([texts], out, big, SEQ, val_fraction=0.0, workers=0, progress=False)
    tok = Tokenizer(big)
    assert tok.vocab_size == 70_400 and json.loads((out / MANIFEST).read_text())["dtype"] == "uint32"
    expected = [
        i for line in texts.read_text().splitlines() for i in [*tok.encode(json.loads(line)["text"]), 1]
    ]
    assert max(expected) > 65_535
    assert _stream(out, "train")[: len(expected)].tolist() == expected


def test_parquet_arrow_and_datasets_folders_prepare_like_jsonl(
    corpus: Path, bpe: Path, tmp_path: Path
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(TEXTS))), "body": TEXTS})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=17)  # several record batches
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=25)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(saved), num_shards=3)
    reference = tmp_path / "ref"
    prepare([corpus], reference, bpe, SEQ, val_fraction=0.1, workers=0, progress=False)
    for source in ("docs.parquet", "docs.arrow", "saved"):
        out = tmp_path / f"out-{source}"
        prepare(
            [tmp_path / source], out, bpe, SEQ, text_field="body", val_fraction=0.1, workers=0, progress=False
        )
        for split in ("train", "validation"):
            assert _stream(out, split).tolist() == _stream(reference, split).tolist(), (source, split)


def test_columnar_mistakes_are_one_line_and_exit_2(bpe: Path, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    for name, words in (
        ("a", "has no column 'text' (it has content)"),
        ("b", "row 2"),
        ("c", "not a readable"),
    ):
        capsys.readouterr()
        code = main(["data", "prepare", str(tmp_path / f"{name}.parquet"), "--tokenizer", str(bpe), "--seq-len",
                     "16", "--out", str(tmp_path / f"out-{name}"), "--workers", "0", "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_USER_ERROR and len(err) == 1 and words in err[0], err
        assert not (tmp_path / f"out-{name}").exists()


def test_a_broken_tokenizer_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match="is not a tokenizers tokenizer.json"):
        Tokenizer(tmp_path)


def test_objectives_refuse_a_tokenizer_without_the_ids_they_need(bpe: Path, tmp_path: Path) -> None:
    """Span corruption needs pad (T5's decoder start) and sentinels; a Llama-3-like tokenizer has neither."""
    from framework.config.schema import DataConfig
    from framework.data.source import make_objective

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((bpe / "tokenizer.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = Tokenizer(bare)
    assert tok.pad_id == -1 and tok.mask_id is None
    make_objective(DataConfig(objective="causal"), tok)  # causal needs neither
    for objective, words in (("span_corruption", "pad"), ("mlm", "<mask>")):
        with pytest.raises(ConfigError, match=words):
            make_objective(DataConfig(objective=objective), tok)
