"""Training and validation batches from prepared datasets (framework.data.shards), per the determinism contract.

A sample is one packed sequence of seq_len + 1 tokens with its document ids; the causal objectives use all of it
(the shifted labels need the extra token), masked LM and span corruption use the first seq_len tokens.

The training stream is infinite and indexed by the *global sample index* g = 0, 1, 2, ...: framework.data.order
maps g to (dataset, sample) as a seeded function of g only, and the objective's randomness for g comes from a
generator seeded with (seed, g). So the tokens and masks of sample g never depend on the batch size, the number of
data-parallel ranks or DataLoader workers, or when the run was resumed: the state is `consumed_samples` + seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.objectives import (
    IGNORE_INDEX,
    Batch,
    causal_lm,
    masked_lm,
    noise_span_counts,
    prefix_lm,
    span_corruption,
)
from framework.data.order import TRAIN, VALIDATION, SampleOrder, check_weights, seed_sequence
from framework.data.shards import PreparedSplit
from framework.data.tokenizer import Tokenizer


def _torch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    state = int(seed_sequence(seed, stream, index).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


@dataclass(frozen=True)
class Objective:
    """An objective bound to its settings: turns samples [B, seq_len + extra_tokens] into a batch."""

    name: str
    extra_tokens: int
    """Tokens a sample needs beyond seq_len (1 for the causal shift, else 0)."""
    apply: Callable[[Tensor, torch.Generator], Batch]
    document_masking: bool = False
    """When set, batches also carry `document_ids` (no attention across packed documents)."""
    pad_id: int | None = None
    """Labels equal to this id (the padding of a split's last sample) are ignored."""

    def __call__(self, tokens: Tensor, document_ids: Tensor, generator: torch.Generator) -> Batch:
        """tokens and document_ids [B, seq_len + 1] -> the batch (objectives without the shift drop the last)."""
        if self.extra_tokens == 0:
            tokens, document_ids = tokens[:, :-1], document_ids[:, :-1]
        batch = self.apply(tokens, generator)
        if self.pad_id is not None and self.pad_id >= 0:  # -1: a tokenizer without pad (padded with eos)
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] == self.pad_id, IGNORE_INDEX)
        if self.document_masking:
            batch["document_ids"] = document_ids[:, : batch["input_ids"].shape[1]].long()
        return batch


def make_objective(cfg: DataConfig, tokenizer: Tokenizer) -> Objective:
    """The objective `cfg.objective` with its settings and the tokenizer's special ids bound."""
    if cfg.objective in ("causal", "prefix"):
        apply = _causal if cfg.objective == "causal" else prefix_lm
        return Objective(cfg.objective, 1, apply, cfg.document_masking, tokenizer.pad_id)
    if cfg.objective == "mlm":
        _require_piece(tokenizer.mask_id is not None, tokenizer, "a <mask> piece", "mlm")
        apply = partial(
            masked_lm,
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            probability=cfg.mlm_probability,
        )
        return Objective("mlm", 0, apply, cfg.document_masking, tokenizer.pad_id)
    return _span_objective(cfg, tokenizer)


def _causal(tokens: Tensor, generator: torch.Generator) -> Batch:
    del generator  # deterministic objective; the argument keeps the Objective signature uniform
    return causal_lm(tokens)


def _span_objective(cfg: DataConfig, tokenizer: Tokenizer) -> Objective:
    if cfg.document_masking:
        raise ConfigError(
            None,
            "data.document_masking",
            True,
            "not supported with span_corruption (spans and sentinels cross document boundaries)",
            "set data.document_masking: false",
        )
    # T5 starts decoding with pad and ends targets with eos: a tokenizer must define both
    _require_piece(tokenizer.pad_id >= 0, tokenizer, "a pad token", "span_corruption")
    _require_piece(tokenizer.eos_id >= 0, tokenizer, "an eos token", "span_corruption")
    _, spans = noise_span_counts(cfg.seq_len, cfg.noise_density, cfg.mean_span_length)
    if spans > len(tokenizer.sentinel_ids):
        raise ConfigError(
            None,
            "data.seq_len",
            cfg.seq_len,
            f"span_corruption makes {spans} noise spans per sequence but the tokenizer has only "
            f"{len(tokenizer.sentinel_ids)} sentinels (<extra_id_N>)",
            "shorten data.seq_len, raise data.mean_span_length, or train a tokenizer with more sentinels",
        )
    apply = partial(
        span_corruption,
        noise_density=cfg.noise_density,
        mean_span_length=cfg.mean_span_length,
        sentinel_ids=tokenizer.sentinel_ids,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    return Objective("span_corruption", 0, apply, False, tokenizer.pad_id)


def _require_piece(ok: bool, tokenizer: Tokenizer, what: str, objective: str) -> None:
    if not ok:
        raise ConfigError(
            None,
            "data.tokenizer",
            str(tokenizer.path),
            f"has no {what}, which data.objective={objective} needs",
            "use a tokenizer that defines it (an HF tokenizer_config.json names pad_token / mask_token), or one "
            "trained by `loom data tokenizer`",
        )


def _rows(datasets: Sequence[PreparedSplit], ids: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """tokens and document ids [len(ids), seq_len + 1] of (dataset, sample) pairs."""
    rows = [datasets[d].sample(i) for d, i in ids]
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
    return tokens, torch.from_numpy(np.stack([r[1] for r in rows]))


def _batch(
    datasets: Sequence[PreparedSplit], objective: Objective, seed: int, stream: int, pairs: Sequence[tuple]
) -> Batch:
    """One micro-batch from ((dataset, sample), stream index) pairs; each row gets its own generator, so a
    sample's batch row is the same whatever else shares its batch."""
    tokens, documents = _rows(datasets, [ids for ids, _ in pairs])
    if objective.name == "causal":
        # Deterministic objective: no generator needed, and the whole batch goes through at once (speed).
        return objective(tokens, documents, torch.Generator())
    rows = [
        objective(tokens[r : r + 1], documents[r : r + 1], _torch_generator(seed, stream, g))
        for r, (_, g) in enumerate(pairs)
    ]
    return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}


class TrainSource:
    """The infinite, resumable, shuffled training stream of one prepared dataset or a weighted mixture."""

    def __init__(
        self,
        datasets: Sequence[PreparedSplit],
        objective: Objective,
        seed: int,
        weights: Sequence[float] | None = None,
        num_workers: int = 0,
        device_type: str = "cpu",
    ) -> None:
        self.datasets = list(datasets)
        self.objective = objective
        self.weights = None if weights is None else list(weights)
        self.num_workers = num_workers
        self.device_type = device_type
        """The device type the batches go to (the run's train.device): decides pinning and read-ahead."""
        self.consumed_samples = 0
        """The stream's position: the global sample index the next step starts at (after skipped ranges)."""
        self.skipped: list[tuple[int, int]] = []
        """[start, end) ranges of global sample positions no step reads (data.skip_samples, loss-spike rewinds)."""
        self._reseed(seed)

    def skip(self, start: int, end: int) -> None:
        """Step over [start, end) from now on: a step that would start inside it starts at `end`."""
        self.skipped = sorted({*self.skipped, (int(start), int(end))})

    def step_start(self, position: int) -> int:
        """Where the step that would start at `position` starts: past every skipped range it falls in."""
        moved = True
        while moved:
            moved = False
            for start, end in self.skipped:
                if start <= position < end:
                    position, moved = end, True
        return position

    def _reseed(self, seed: int) -> None:
        self.seed = seed
        self.order = SampleOrder([len(d) for d in self.datasets], self.weights, seed)

    def sample_id(self, global_index: int) -> tuple[int, int]:
        """(dataset, sample) that global sample `global_index` is."""
        return self.order(global_index)

    def micro_batch(self, global_indices: Sequence[int]) -> Batch:
        """The batch of the given global sample indices, in that order."""
        pairs = [(self.order(g), g) for g in global_indices]
        return _batch(self.datasets, self.objective, self.seed, TRAIN, pairs)

    def step_indices(
        self, start: int, global_batch_size: int, micro: int, rank: int, size: int
    ) -> list[range]:
        """Rank `rank`'s micro-batches of the step whose global samples are [start, start + global_batch_size):
        the rank-th of `size` equal contiguous slices, cut into micro-batches of `micro`."""
        first = start + rank * (global_batch_size // size)
        return [range(s, s + micro) for s in range(first, first + global_batch_size // size, micro)]

    def batches(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        size_at: Callable[[int], int] | None = None,
    ) -> Iterator[list[Batch]]:
        """Per optimizer step, this rank's micro-batches (see `step_indices`), read by `num_workers` DataLoader
        workers (0: in this process; the batches are the same). `consumed_samples` advances by the global batch
        when a step is handed to training, not when workers prefetch it, so a checkpoint written after the step
        resumes with the next one. `size_at(position)`: the global batch of the step starting at a data position
        (a batch-size ramp; default global_batch_size throughout)."""
        size_at = size_at or (lambda _: global_batch_size)
        _check_batching(global_batch_size, micro_batch_size, dp_rank, dp_size)
        requests = _Requests(self, self.consumed_samples, size_at, micro_batch_size, dp_rank, dp_size)
        loader = iter(_loader(_MicroBatches(self), requests, self.num_workers, self.device_type))
        while True:
            start = self.step_start(self.consumed_samples)
            size = size_at(start)
            _check_batching(size, micro_batch_size, dp_rank, dp_size)
            try:
                step = [_unwrap(next(loader)) for _ in range(size // (micro_batch_size * dp_size))]
            except ConfigError:
                loader = None  # stop the workers now, not when the error's traceback is collected
                raise
            self.consumed_samples = start + size
            yield step

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the stream (the skipped ranges too, so a resume keeps stepping over them)."""
        state: dict[str, Any] = {"consumed_samples": self.consumed_samples, "seed": self.seed}
        if self.skipped:
            state["skipped"] = [list(r) for r in self.skipped]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: continue after `consumed_samples` with the checkpoint's seed (hence the same order), also
        stepping over the ranges it skipped (besides this run's data.skip_samples)."""
        self.consumed_samples = int(state["consumed_samples"])
        self._reseed(int(state["seed"]))
        for start, end in state.get("skipped", []):
            self.skip(start, end)


class _Requests:
    """The DataLoader's sampler: this rank's micro-batches (tuples of global indices), step after step."""

    def __init__(
        self, source: TrainSource, start: int, size_at: Callable[[int], int], micro: int, rank: int, size: int
    ) -> None:
        self.source, self.start, self.size_at, self.args = source, start, size_at, (micro, rank, size)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        start = self.start
        while True:
            start = self.source.step_start(start)
            gbs = self.size_at(start)
            for micro in self.source.step_indices(start, gbs, *self.args):
                yield tuple(micro)
            start += gbs


class _MicroBatches(Dataset):
    """Map-style dataset whose items are micro-batches, keyed by their tuple of global sample indices."""

    def __init__(self, source: TrainSource) -> None:
        self.source = source

    def __getitem__(self, indices: tuple[int, ...]) -> Batch | _Failed:
        try:
            return self.source.micro_batch(indices)
        except ConfigError as error:
            if get_worker_info() is None:
                raise
            return _Failed(error)


class _Failed:
    """A ConfigError met in a DataLoader worker (e.g. a corrupt sample), handed back as the batch: torch would
    re-raise a worker's exception as a RuntimeError with the worker's traceback instead of the one line."""

    def __init__(self, error: ConfigError) -> None:
        self.fields = (error.file, error.key, error.value, error.rule, error.fix)


def _unwrap(item: Batch | _Failed) -> Batch:
    if isinstance(item, _Failed):
        raise ConfigError(*item.fields)
    return item


READ_AHEAD = 2
"""Micro-batches each DataLoader worker keeps read ahead of training (DataLoader's prefetch_factor)."""


def loader_options(device_type: str, num_workers: int) -> dict[str, Any]:
    """DataLoader settings for batches bound for `device_type`. CUDA: pinned (page-locked) host memory, so the
    train module's `.to(device, non_blocking=True)` is an asynchronous DMA rather than a copy staged through
    pageable memory that blocks the host; and at least one worker, so READ_AHEAD micro-batches per worker are
    read while the GPU computes (with 0 workers nothing is read ahead). Batches are the same either way. CPU:
    there is no device to overlap with, so data.num_workers as given and no pinning."""
    if device_type == "cuda":
        num_workers = max(num_workers, 1)
    return {
        "num_workers": num_workers,
        "pin_memory": device_type == "cuda",
        "prefetch_factor": READ_AHEAD if num_workers else None,
    }


def _loader(dataset: Dataset, sampler: _Requests, num_workers: int, device_type: str = "cpu") -> DataLoader:
    # batch_size=None: the sampler's items already are whole micro-batches; the loader keeps their order.
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        persistent_workers=False,
        **loader_options(device_type, num_workers),
        # Its own generator: starting an iterator draws a worker base seed, which from torch's default generator
        # would shift the dropout stream a resumed run has just restored (the data order needs no randomness).
        generator=torch.Generator().manual_seed(0),
    )


def _check_batching(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ConfigError(
            None,
            "train.global_batch_size",
            global_batch_size,
            f"must be a multiple of train.micro_batch_size x data-parallel ranks = "
            f"{micro_batch_size} x {dp_size}",
            f"use a multiple of {micro_batch_size * dp_size}",
        )


class ValidationSource:
    """Held-out batches: the first samples of a validation split, in index order, with fixed objective
    randomness, so every evaluation sees exactly the same batches."""

    def __init__(self, split: PreparedSplit, objective: Objective, seed: int) -> None:
        self.split = split
        self.objective = objective
        self.seed = seed

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return len(self.split)

    def num_batches(self, micro_batch_size: int) -> int:
        """Full micro-batches the split holds."""
        return self.num_samples // micro_batch_size

    def batches(
        self, micro_batch_size: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[Batch]:
        """This rank's share of the first min(num_batches, num_batches(micro_batch_size)) micro-batches:
        micro-batch j goes to rank j % dp_size (sum the losses and label counts over ranks)."""
        _check_batching(micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
        for j in range(dp_rank, min(num_batches, self.num_batches(micro_batch_size)), dp_size):
            pairs = [((0, i), i) for i in range(j * micro_batch_size, (j + 1) * micro_batch_size)]
            yield _batch([self.split], self.objective, self.seed, VALIDATION, pairs)


def build_data(
    data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer: Tokenizer | None = None, device_type: str = "cpu"
) -> tuple[TrainSource, ValidationSource | None]:
    """The training stream and (unless data.validation is null) the validation batches of a recipe, after
    checking the prepared datasets are intact, match the tokenizer, and that the tokenizer fits the model.
    `device_type` is where the training batches go (see loader_options)."""
    tokenizer = tokenizer if tokenizer is not None else Tokenizer(data_cfg.tokenizer)
    _check_vocab(tokenizer, model_cfg)
    objective = make_objective(data_cfg, tokenizer)
    paths = [data_cfg.train] if isinstance(data_cfg.train, str) else list(data_cfg.train)
    keys = (
        ["data.train"] if isinstance(data_cfg.train, str) else [f"data.train[{i}]" for i in range(len(paths))]
    )
    datasets = [_open(data_cfg, path, "train", key, tokenizer) for path, key in zip(paths, keys)]
    check_weights(
        data_cfg.weights if data_cfg.weights is not None else [len(d) for d in datasets], len(paths)
    )
    train = TrainSource(
        datasets, objective, data_cfg.seed, data_cfg.weights, data_cfg.num_workers, device_type
    )
    for start, end in data_cfg.skip_samples:
        train.skip(start, end)
    if data_cfg.validation is None:
        return train, None
    split = _open(data_cfg, data_cfg.validation, "validation", "data.validation", tokenizer)
    return train, ValidationSource(split, objective, data_cfg.seed)


def _open(cfg: DataConfig, path: str, split: str, key: str, tokenizer: Tokenizer) -> PreparedSplit:
    samples = PreparedSplit(path, split, key, cfg.seq_len, cfg.verify, vocab_size=tokenizer.vocab_size)
    built_with = samples.manifest["tokenizer"]["sha256"]
    if built_with != tokenizer.sha256:
        raise ConfigError(
            None,
            "data.tokenizer",
            str(tokenizer.path),
            f"is not the tokenizer {key}={path} was prepared with (sha256 {tokenizer.sha256[:12]}... "
            f"vs the manifest's {built_with[:12]}...)",
            f"point data.tokenizer at the tokenizer used for {path}, or prepare it again",
        )
    if len(samples) == 0:
        raise ConfigError(
            None,
            key,
            path,
            f"its {split} split holds no samples",
            "prepare more text, or (validation) a larger --val-fraction, or set data.validation: null",
        )
    return samples


def _check_vocab(tokenizer: Tokenizer, model_cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        suggested = -(-tokenizer.vocab_size // 64) * 64
        raise ConfigError(
            None,
            "model.vocab_size",
            model_cfg.vocab_size,
            f"smaller than the tokenizer's {tokenizer.vocab_size} pieces ({tokenizer.path})",
            f"set model.vocab_size to at least {tokenizer.vocab_size} (e.g. {suggested}, a multiple of 64)",
        )
