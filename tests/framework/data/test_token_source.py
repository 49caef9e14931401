"""TokenSource / ValidationSource / build_data: order, resumption, data-parallel slices, user errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.objectives import causal_lm
from framework.data.source import Objective, TokenSource, ValidationSource, build_data, make_objective
from framework.data.token_file import sidecar_path, write_token_file
from framework.data.tokenizer import Tokenizer

SEQ = 8


def causal(tokens: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return causal_lm(tokens)


CAUSAL = Objective("causal", 1, causal)


def counting_file(path: Path, tokens: int) -> Path:
    """A token file holding 0, 1, 2, ...: every sample says where it came from."""
    write_token_file(
        path, [list(range(tokens - 1))], eos_id=tokens - 1, vocab_size=60000, tokenizer_sha256="x"
    )
    return path


@pytest.fixture
def counting(tmp_path: Path) -> Path:
    return counting_file(tmp_path / "count.bin", 20 * SEQ + 1)  # exactly 20 causal samples


def flat(step: list[dict[str, torch.Tensor]], key: str = "input_ids") -> torch.Tensor:
    return torch.cat([micro[key] for micro in step])


def test_samples_are_consecutive_windows_with_one_extra_token(counting: Path) -> None:
    source = TokenSource(counting, SEQ, CAUSAL, seed=1)
    assert source.num_samples == 20
    for g in range(5):
        i = source.sample_index(g)
        assert source.samples[i].tolist() == list(range(i * SEQ, i * SEQ + SEQ + 1))


def test_order_is_seeded_and_covers_every_sample_once_per_epoch(counting: Path) -> None:
    a, b, c = (TokenSource(counting, SEQ, CAUSAL, seed=s) for s in (1, 1, 2))
    order_a = [a.sample_index(g) for g in range(60)]
    assert order_a == [b.sample_index(g) for g in range(60)]
    assert order_a != [c.sample_index(g) for g in range(60)]
    epochs = [order_a[e * 20 : (e + 1) * 20] for e in range(3)]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # a new permutation each epoch


def test_resume_from_state_continues_the_same_stream(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = counting_file(tmp_path / "t.bin", 30 * SEQ)
    objective = make_objective(DataConfig(objective="mlm", seq_len=SEQ), tiny_tokenizer)
    straight = TokenSource(path, SEQ, objective, seed=3)
    steps = straight.batches(global_batch_size=8, micro_batch_size=4)
    for _ in range(3):
        next(steps)
    state = straight.state_dict()
    assert state == {"consumed_samples": 24, "seed": 3}
    expected = [next(steps) for _ in range(3)]  # crosses the epoch boundary at sample 30
    resumed = TokenSource(path, SEQ, objective, seed=999)
    resumed.load_state_dict(state)
    got = resumed.batches(global_batch_size=8, micro_batch_size=4)
    for want in expected:
        have = next(got)
        for key in ("input_ids", "labels"):
            assert torch.equal(flat(have, key), flat(want, key))


def test_dp_slices_partition_the_global_batch_and_batching_does_not_matter(
    tmp_path: Path, tiny_tokenizer: Tokenizer
) -> None:
    path = counting_file(tmp_path / "t.bin", 40 * SEQ)
    objective = make_objective(DataConfig(objective="mlm", seq_len=SEQ), tiny_tokenizer)
    whole = next(TokenSource(path, SEQ, objective, seed=5).batches(16, 16))
    for dp_size, micro in [(2, 4), (4, 2), (4, 4), (1, 2)]:
        parts = []
        for rank in range(dp_size):
            step = next(TokenSource(path, SEQ, objective, seed=5).batches(16, micro, rank, dp_size))
            assert len(step) == 16 // dp_size // micro
            parts.append(step)
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([flat(step, key) for step in parts]), flat(whole, key))


def test_validation_batches_are_fixed_and_in_file_order(counting: Path) -> None:
    val = ValidationSource(counting, SEQ, CAUSAL, seed=0)
    first = list(val.batches(micro_batch_size=4, num_batches=3))
    assert len(first) == 3 and len(list(val.batches(4, 100))) == 5  # capped at what the file holds
    assert first[0]["input_ids"][:, 0].tolist() == [0, 8, 16, 24]
    again = list(val.batches(4, 3))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again))
    shards = [list(val.batches(4, 3, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 1]
    assert torch.equal(shards[1][0]["input_ids"], first[1]["input_ids"])


def test_global_batch_must_split_over_ranks(counting: Path) -> None:
    source = TokenSource(counting, SEQ, CAUSAL, seed=0)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        next(source.batches(global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2))


# --- build_data: the recipe's view -------------------------------------------------------------------------------


@pytest.fixture
def demo_files(tmp_path: Path, tiny_tokenizer: Tokenizer, small_texts: list[str]) -> DataConfig:
    ids = tiny_tokenizer.encode_batch(small_texts)
    for name, docs in (("train", ids[20:]), ("val", ids[:20])):
        write_token_file(
            tmp_path / f"{name}.bin",
            docs,
            eos_id=tiny_tokenizer.eos_id,
            vocab_size=tiny_tokenizer.vocab_size,
            tokenizer_sha256=tiny_tokenizer.sha256,
        )
    return DataConfig(
        tokenizer=str(tiny_tokenizer.path),
        train=str(tmp_path / "train.bin"),
        validation=str(tmp_path / "val.bin"),
        seq_len=32,
    )


MODEL = ModelConfig(vocab_size=512)


@pytest.mark.parametrize("objective", ["causal", "prefix", "mlm", "span_corruption"])
def test_build_data_gives_contract_batches(demo_files: DataConfig, objective: str) -> None:
    cfg = replace(demo_files, objective=objective, document_masking=objective != "span_corruption")
    train, val = build_data(cfg, MODEL)
    batch = next(train.batches(4, 2))[0]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 2
    assert int(batch["input_ids"].max()) < MODEL.vocab_size
    expected = {
        "causal": {"input_ids", "labels", "document_ids"},
        "prefix": {"input_ids", "labels", "document_ids", "prefix_lengths"},
        "mlm": {"input_ids", "labels", "document_ids"},
        "span_corruption": {"input_ids", "labels", "decoder_input_ids"},
    }[objective]
    assert set(batch) == expected
    assert val is not None and next(val.batches(2, 1))["input_ids"].shape == batch["input_ids"].shape


def test_build_data_without_validation(demo_files: DataConfig) -> None:
    _, val = build_data(replace(demo_files, validation=None), MODEL)
    assert val is None


def expect_error(
    cfg: DataConfig, key: str, model: ModelConfig = MODEL, tokenizer: Tokenizer | None = None
) -> str:
    with pytest.raises(ConfigError) as info:
        build_data(cfg, model, tokenizer)
    assert info.value.key == key and info.value.fix
    return str(info.value)


def test_missing_files_are_config_errors(demo_files: DataConfig, tmp_path: Path) -> None:
    message = expect_error(replace(demo_files, train=str(tmp_path / "nope.bin")), "data.train")
    assert "make data" in message
    expect_error(replace(demo_files, validation=str(tmp_path / "nope.bin")), "data.validation")
    expect_error(replace(demo_files, tokenizer=str(tmp_path / "nope.model")), "data.tokenizer")
    sidecar_path(demo_files.train).unlink()
    expect_error(demo_files, "data.train")


def test_corrupt_files_are_config_errors(demo_files: DataConfig, tmp_path: Path) -> None:
    with open(demo_files.train, "ab") as f:
        f.write(b"\0")  # odd byte count: truncated or wrong dtype
    with pytest.raises(ConfigError, match="tokens"):
        build_data(demo_files, MODEL)
    sidecar_path(demo_files.train).write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        build_data(demo_files, MODEL)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"definitely not a model")
    expect_error(replace(demo_files, tokenizer=str(garbage)), "data.tokenizer")


def test_vocab_and_tokenizer_mismatches_are_config_errors(
    demo_files: DataConfig, tmp_path: Path, small_texts: list[str]
) -> None:
    message = expect_error(demo_files, "model.vocab_size", model=ModelConfig(vocab_size=300))
    assert "400" in message
    from framework.data.tokenizer import train_tokenizer

    other = train_tokenizer(small_texts[:150], tmp_path / "other.model", 380, num_sentinels=8, num_threads=1)
    expect_error(replace(demo_files, tokenizer=str(other.path)), "data.tokenizer")


def test_impossible_settings_are_config_errors(demo_files: DataConfig) -> None:
    expect_error(replace(demo_files, seq_len=10**7), "data.seq_len")
    # 8 sentinels cannot mark round(round(512 * 0.15) / 3) = 26 spans.
    expect_error(replace(demo_files, objective="span_corruption", seq_len=512), "data.seq_len")
    expect_error(
        replace(demo_files, objective="span_corruption", document_masking=True), "data.document_masking"
    )


def test_token_file_round_trip(tmp_path: Path) -> None:
    meta = write_token_file(
        tmp_path / "a.bin", [[5, 6], [], [7]], eos_id=1, vocab_size=70000, tokenizer_sha256="h"
    )
    assert meta["dtype"] == "uint32" and meta["tokens"] == 6 and meta["documents"] == 3
    assert np.fromfile(tmp_path / "a.bin", dtype="<u4").tolist() == [5, 6, 1, 1, 7, 1]
