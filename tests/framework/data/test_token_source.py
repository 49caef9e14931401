"""The determinism contract: sample ids of every global batch across save/restore, DP sizes and workers;
build_data and its user errors (missing/corrupt shards, hash and tokenizer mismatches)."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import framework.data.source as source_module
from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.shards import MANIFEST
from framework.data.source import TrainSource, build_data, loader_options
from framework.data.tokenizer import Tokenizer

MODEL = ModelConfig(vocab_size=512)
GLOBAL, MICRO = 8, 2


@pytest.fixture
def cfg(prepared: Path, tiny_tokenizer: Tokenizer) -> DataConfig:
    return DataConfig(
        tokenizer=str(tiny_tokenizer.path), train=str(prepared), validation=str(prepared), seq_len=32
    )


def flat(step: list[dict[str, torch.Tensor]], key: str = "input_ids") -> torch.Tensor:
    return torch.cat([micro[key] for micro in step])


def global_steps(
    cfg: DataConfig, steps: int, dp_size: int = 1, state: dict | None = None
) -> list[torch.Tensor]:
    """Each step's global batch, gathered from all ranks in rank order (as an all-gather would)."""
    sources = [build_data(cfg, MODEL)[0] for _ in range(dp_size)]
    for source in sources:
        if state is not None:
            source.load_state_dict(state)
    streams = [s.batches(GLOBAL, MICRO, rank, dp_size) for rank, s in enumerate(sources)]
    return [torch.cat([flat(next(stream)) for stream in streams]) for _ in range(steps)]


def sample_ids(source: TrainSource, step: int) -> list[tuple[int, int]]:
    return [source.sample_id(g) for g in range(step * GLOBAL, (step + 1) * GLOBAL)]


def test_order_is_seeded_and_covers_every_sample_once_per_epoch(cfg: DataConfig) -> None:
    a, b, c = (build_data(replace(cfg, seed=s), MODEL)[0] for s in (1, 1, 2))
    n = len(a.datasets[0])
    order_a = [a.sample_id(g)[1] for g in range(3 * n)]
    assert order_a == [b.sample_id(g)[1] for g in range(3 * n)]
    assert order_a != [c.sample_id(g)[1] for g in range(3 * n)]
    assert all(sorted(order_a[e * n : (e + 1) * n]) == list(range(n)) for e in range(3))


def test_batches_hold_the_samples_of_their_global_indices(cfg: DataConfig) -> None:
    source = build_data(cfg, MODEL)[0]
    step = flat(next(source.batches(GLOBAL, MICRO)))
    rows = [
        torch.from_numpy(source.datasets[0].sample(i)[0][:-1].astype("int64"))
        for _, i in sample_ids(source, 0)
    ]
    assert torch.equal(step, torch.stack(rows))


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_same_global_batches_across_restore_dp_size_and_workers(cfg: DataConfig, objective: str) -> None:
    cfg = replace(cfg, objective=objective)
    straight = global_steps(cfg, 6, dp_size=4)
    source = build_data(cfg, MODEL)[0]
    stream = source.batches(GLOBAL, MICRO, 0, 4)
    for _ in range(3):
        next(stream)
    state = source.state_dict()
    assert state == {"consumed_samples": 3 * GLOBAL, "seed": cfg.seed}
    resumed_on_two = global_steps(cfg, 3, dp_size=2, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed_on_two))
    with_workers = global_steps(replace(cfg, num_workers=2), 6, dp_size=1)
    assert all(torch.equal(a, b) for a, b in zip(straight, with_workers))


def test_consumed_counts_training_not_prefetching(cfg: DataConfig) -> None:
    source = build_data(replace(cfg, num_workers=2), MODEL)[0]
    stream = source.batches(GLOBAL, MICRO)
    next(stream)
    next(stream)
    assert source.consumed_samples == 2 * GLOBAL  # workers have read ahead; training took two steps


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_for_cuda_are_pinned_and_read_at_least_two_ahead(workers: int) -> None:
    cuda, cpu = loader_options("cuda", workers), loader_options("cpu", workers)
    assert cuda["pin_memory"] and cuda["num_workers"] >= max(workers, 1)
    assert cuda["num_workers"] * cuda["prefetch_factor"] >= 2  # micro-batches in flight ahead of the GPU
    assert not cpu["pin_memory"] and cpu["num_workers"] == workers  # on CPU: data.num_workers as given


def test_build_data_hands_the_device_type_to_the_loader(cfg: DataConfig, monkeypatch) -> None:
    made: list[dict] = []

    def recording_loader(dataset, **kwargs):  # noqa: ANN001, ANN202
        made.append(kwargs)
        return DataLoader(dataset, **{**kwargs, "pin_memory": False})  # no CUDA here to pin for

    monkeypatch.setattr(source_module, "DataLoader", recording_loader)
    expected = global_steps(cfg, 2)
    stream = build_data(cfg, MODEL, device_type="cuda")[0].batches(GLOBAL, MICRO)
    assert [torch.equal(flat(next(stream)), e) for e in expected] == [True, True]  # the same batches
    assert made[-1]["pin_memory"] and made[-1]["num_workers"] * made[-1]["prefetch_factor"] >= 2
    assert not made[0]["pin_memory"]  # global_steps built for the CPU


def test_batches_follow_the_contract(cfg: DataConfig) -> None:
    for objective in ("causal", "prefix", "mlm", "span_corruption"):
        train, val = build_data(
            replace(cfg, objective=objective, document_masking=objective != "span_corruption"), MODEL
        )
        batch = next(train.batches(4, 2))[0]
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 2
        expected = {
            "causal": {"input_ids", "labels", "document_ids"},
            "prefix": {"input_ids", "labels", "document_ids", "prefix_lengths"},
            "mlm": {"input_ids", "labels", "document_ids"},
            "span_corruption": {"input_ids", "labels", "decoder_input_ids"},
        }[objective]
        assert set(batch) == expected
        assert val is not None and next(val.batches(2, 1))["input_ids"].shape == batch["input_ids"].shape


def test_padding_is_never_a_label(cfg: DataConfig, tiny_tokenizer: Tokenizer) -> None:
    val = build_data(cfg, MODEL)[1]
    assert val is not None
    last = val.num_samples - 1
    from framework.data.source import _batch

    batch = _batch([val.split], val.objective, 0, 0, [((0, last), last)])
    assert (batch["input_ids"] == tiny_tokenizer.pad_id).any()
    assert not (batch["labels"] == tiny_tokenizer.pad_id).any()


def expect_error(cfg: DataConfig, key: str, model: ModelConfig = MODEL) -> str:
    with pytest.raises(ConfigError) as info:
        build_data(cfg, model)
    assert info.value.key == key and info.value.fix and "\n" not in str(info.value)
    return str(info.value)


def copy_dataset(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_missing_truncated_or_corrupt_shards_are_config_errors(
    cfg: DataConfig, prepared: Path, tmp_path: Path
) -> None:
    expect_error(replace(cfg, train=str(tmp_path / "absent")), "data.train")
    expect_error(replace(cfg, tokenizer=str(tmp_path / "absent.model")), "data.tokenizer")
    data = copy_dataset(prepared, tmp_path / "copy")
    cfg = replace(cfg, train=str(data), validation=None)
    (data / "train-00001.tar").unlink()
    assert "missing" in expect_error(cfg, "data.train")
    (data / "train-00001.tar").write_bytes((prepared / "train-00001.tar").read_bytes()[:-512])
    assert "truncated" in expect_error(cfg, "data.train")
    corrupt = bytearray((prepared / "train-00001.tar").read_bytes())
    corrupt[5000] ^= 1
    (data / "train-00001.tar").write_bytes(bytes(corrupt))
    assert "sha256" in expect_error(cfg, "data.train")
    build_data(replace(cfg, verify="size"), MODEL)  # sizes only: the flipped bit goes unnoticed, by choice
    (data / MANIFEST).write_text("{not json")
    assert "manifest" in expect_error(cfg, "data.train")


def test_tokenizer_and_vocab_mismatches_are_config_errors(
    cfg: DataConfig, tmp_path: Path, small_texts: list[str]
) -> None:
    assert "400" in expect_error(cfg, "model.vocab_size", model=ModelConfig(vocab_size=300))
    from framework.data.tokenizer import train_tokenizer

    other = train_tokenizer(small_texts[:150], tmp_path / "other.model", 380, num_sentinels=8, num_threads=1)
    assert "prepared with" in expect_error(replace(cfg, tokenizer=str(other.path)), "data.tokenizer")


def test_impossible_settings_are_config_errors(cfg: DataConfig, prepared: Path) -> None:
    expect_error(replace(cfg, seq_len=64), "data.seq_len")  # not a divisor of the prepared 32
    # 8 sentinels cannot mark the 16 spans of 16 noise tokens among 32.
    expect_error(
        replace(cfg, objective="span_corruption", noise_density=0.5, mean_span_length=1.0), "data.seq_len"
    )
    expect_error(replace(cfg, objective="span_corruption", document_masking=True), "data.document_masking")
    expect_error(replace(cfg, train=[str(prepared)] * 2, weights=[1.0]), "data.weights")
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["splits"]["validation"]["samples"] > 0


def test_skipped_ranges_are_stepped_over_and_resume(cfg: DataConfig) -> None:
    """data.skip_samples: a step that would start inside [start, end) starts at end; the other steps are the
    stream's own, the ranges travel in the state (a resume on another dp size keeps skipping them), and a range
    whose start is inside a step takes effect at the next step start."""
    straight = global_steps(cfg, 8)
    skipping = global_steps(replace(cfg, skip_samples=[(2 * GLOBAL, 4 * GLOBAL)]), 6)
    assert all(torch.equal(a, b) for a, b in zip(straight[:2] + straight[4:], skipping, strict=True))
    source = build_data(replace(cfg, skip_samples=[(2 * GLOBAL, 4 * GLOBAL)]), MODEL)[0]
    stream = source.batches(GLOBAL, MICRO)
    for _ in range(3):
        next(stream)
    state = source.state_dict()
    assert state["consumed_samples"] == 5 * GLOBAL and state["skipped"] == [[2 * GLOBAL, 4 * GLOBAL]]
    resumed = global_steps(cfg, 2, dp_size=2, state=state)
    assert all(torch.equal(a, b) for a, b in zip(straight[5:7], resumed, strict=True))
    mid = global_steps(replace(cfg, skip_samples=[(GLOBAL + 1, 3 * GLOBAL)]), 3)
    assert torch.equal(mid[1], straight[1]) and torch.equal(mid[2], straight[3])


def test_a_bad_skip_range_is_a_config_error(cfg: DataConfig) -> None:
    with pytest.raises(ConfigError) as err:
        replace(cfg, skip_samples=[(5, 5)]).validate()
    assert err.value.key == "data.skip_samples[0]"


def test_a_batch_ramp_keeps_the_order_and_resumes_on_another_dp_size(cfg: DataConfig) -> None:
    """Steps of a ramp are consecutive runs of the plain order, of the ramp's sizes; resumed mid-ramp on 2 ranks
    (from a state of 4) the global batches are the same."""
    from framework.config.schema import BatchRampConfig

    ramp = BatchRampConfig(start=MICRO * 4, increment=MICRO * 4, over_tokens=6 * GLOBAL * cfg.seq_len)
    size_at = partial(ramp.size_at, 4 * GLOBAL, cfg.seq_len)

    def steps(dp_size: int, count: int, state: dict | None = None) -> tuple[list[torch.Tensor], TrainSource]:
        sources = [build_data(cfg, MODEL)[0] for _ in range(dp_size)]
        for s in sources:
            if state is not None:
                s.load_state_dict(state)
        streams = [s.batches(4 * GLOBAL, MICRO, r, dp_size, size_at) for r, s in enumerate(sources)]
        return [torch.cat([flat(next(st)) for st in streams]) for _ in range(count)], sources[0]

    ramped, source = steps(4, 6)
    plain = torch.cat(global_steps(cfg, 20))
    sizes = [len(b) for b in ramped]
    assert sizes[0] == MICRO * 4 and sizes == sorted(sizes) and len(set(sizes)) > 2, sizes
    assert torch.equal(torch.cat(ramped), plain[: sum(sizes)])  # the plain order, cut differently
    _, first = steps(4, 3)
    resumed, _ = steps(2, 3, first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ramped[3:], resumed, strict=True))
