"""Training and validation batches from packed token files (framework.data.token_file).

Sample i of a file is tokens[i * seq_len : i * seq_len + sample_len], where sample_len is seq_len + 1 for the
causal objectives (the shifted labels need one more token) and seq_len for masked LM and span corruption.

The training stream is infinite and indexed by the *global sample index* g = 0, 1, 2, ...: epoch e = g // n
visits the n samples in a permutation drawn from (seed, e), and the objective's randomness for g comes from a
generator seeded with (seed, g). So which tokens and which masks a sample gets depends on g only — never on the
batch size, the number of data-parallel ranks or when the run was resumed — and resuming needs nothing but
`consumed_samples`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from framework.config.errors import ConfigError
from framework.config.schema import DataConfig, ModelConfig
from framework.data.objectives import (
    Batch,
    causal_lm,
    document_ids_from_eos,
    masked_lm,
    noise_span_counts,
    prefix_lm,
    span_corruption,
)
from framework.data.token_file import open_tokens
from framework.data.tokenizer import Tokenizer

# Independent random streams derived from one seed: sample order, training objective, validation objective.
_ORDER, _TRAIN, _VALIDATION = 0, 1, 2


def _seed_sequence(seed: int, stream: int, index: int) -> np.random.SeedSequence:
    # SeedSequence hashes its words well (nearby seeds give unrelated streams) and is stable across numpy versions.
    return np.random.SeedSequence([seed % 2**64, stream, index])


def _torch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    state = int(_seed_sequence(seed, stream, index).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


@dataclass(frozen=True)
class Objective:
    """An objective bound to its settings: turns samples [B, seq_len + extra_tokens] into a batch."""

    name: str
    extra_tokens: int
    """Tokens a sample needs beyond seq_len (1 for the causal shift, else 0)."""
    apply: Callable[[Tensor, torch.Generator], Batch]
    document_eos_id: int | None = None
    """When set, batches also carry `document_ids` (document masking), split at this eos id."""

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> Batch:
        batch = self.apply(tokens, generator)
        if self.document_eos_id is not None:
            batch["document_ids"] = document_ids_from_eos(batch["input_ids"], self.document_eos_id)
        return batch


def make_objective(cfg: DataConfig, tokenizer: Tokenizer) -> Objective:
    """The objective `cfg.objective` with its settings and the tokenizer's special ids bound."""
    if cfg.objective in ("causal", "prefix"):
        apply = _causal if cfg.objective == "causal" else prefix_lm
        return Objective(cfg.objective, 1, apply, tokenizer.eos_id if cfg.document_masking else None)
    if cfg.objective == "mlm":
        _require_piece(tokenizer.mask_id is not None, tokenizer, "a <mask> piece", "mlm")
        apply = partial(
            masked_lm,
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tokenizer.special_ids,
            probability=cfg.mlm_probability,
        )
        return Objective("mlm", 0, apply, tokenizer.eos_id if cfg.document_masking else None)
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
    return Objective("span_corruption", 0, apply)


def _require_piece(ok: bool, tokenizer: Tokenizer, what: str, objective: str) -> None:
    if not ok:
        raise ConfigError(
            None,
            "data.tokenizer",
            str(tokenizer.path),
            f"has no {what}, which data.objective={objective} needs",
            "use a tokenizer trained by framework.data.tokenizer.train_tokenizer (`make data` builds one)",
        )


class PackedSamples:
    """Fixed-length samples of a token file, read through a memory map (pages are read on demand)."""

    def __init__(self, path: str | Path, seq_len: int, extra_tokens: int, key: str) -> None:
        self.path = Path(path)
        self.key = key
        self.tokens, self.meta = open_tokens(path, key)
        self.seq_len = seq_len
        self.sample_len = seq_len + extra_tokens
        self.num_samples = max(0, (len(self.tokens) - extra_tokens) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tensor:
        start = index * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.sample_len].astype(np.int64))


def _batch(
    samples: PackedSamples, objective: Objective, seed: int, stream: int, pairs: Sequence[tuple]
) -> Batch:
    """One micro-batch from (sample id, stream index) pairs; each row gets its own generator, so a sample's
    batch row is the same whatever else shares its batch."""
    rows = [objective(samples[i][None, :], _torch_generator(seed, stream, g)) for i, g in pairs]
    return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}


class TokenSource:
    """The infinite, resumable, shuffled training stream of a token file."""

    def __init__(
        self, path: str | Path, seq_len: int, objective: Objective, seed: int, key: str = "data.train"
    ) -> None:
        self.samples = PackedSamples(path, seq_len, objective.extra_tokens, key)
        self.objective = objective
        self.seed = seed
        self.consumed_samples = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch

    @property
    def num_samples(self) -> int:
        """Samples per epoch."""
        return len(self.samples)

    def sample_index(self, global_index: int) -> int:
        """Which sample of the file global sample `global_index` is."""
        epoch, position = divmod(global_index, self.num_samples)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(_seed_sequence(self.seed, _ORDER, epoch))
            self._order = (epoch, rng.permutation(self.num_samples))
        return int(self._order[1][position])

    def micro_batch(self, global_indices: Sequence[int]) -> Batch:
        """The batch of the given global sample indices, in that order."""
        pairs = [(self.sample_index(g), g) for g in global_indices]
        return _batch(self.samples, self.objective, self.seed, _TRAIN, pairs)

    def batches(
        self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[list[Batch]]:
        """Per optimizer step, this rank's micro-batches: rank r takes the r-th of dp_size equal contiguous slices
        of the step's global samples [consumed, consumed + global_batch_size), cut into micro-batches.
        `consumed_samples` advances by the global batch as each step is handed out (so a checkpoint written
        after the step resumes with the next one)."""
        _check_batching(global_batch_size, micro_batch_size, dp_rank, dp_size)
        per_rank = global_batch_size // dp_size
        while True:
            first = self.consumed_samples + dp_rank * per_rank
            step = [
                self.micro_batch(range(start, start + micro_batch_size))
                for start in range(first, first + per_rank, micro_batch_size)
            ]
            self.consumed_samples += global_batch_size
            yield step

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume the stream."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: continue after `consumed_samples` with the checkpoint's seed (hence the same order)."""
        self.consumed_samples = int(state["consumed_samples"])
        self.seed = int(state["seed"])
        self._order = None


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
    """Held-out batches: the first samples of a token file, in file order, with fixed objective randomness, so
    every evaluation sees exactly the same batches."""

    def __init__(
        self, path: str | Path, seq_len: int, objective: Objective, seed: int, key: str = "data.validation"
    ) -> None:
        self.samples = PackedSamples(path, seq_len, objective.extra_tokens, key)
        self.objective = objective
        self.seed = seed

    @property
    def num_samples(self) -> int:
        """Samples in the file."""
        return len(self.samples)

    def num_batches(self, micro_batch_size: int) -> int:
        """Full micro-batches the file holds."""
        return self.num_samples // micro_batch_size

    def batches(
        self, micro_batch_size: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[Batch]:
        """This rank's share of the first min(num_batches, num_batches(micro_batch_size)) micro-batches:
        micro-batch j goes to rank j % dp_size (sum the losses and label counts over ranks)."""
        _check_batching(micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
        for j in range(dp_rank, min(num_batches, self.num_batches(micro_batch_size)), dp_size):
            indices = range(j * micro_batch_size, (j + 1) * micro_batch_size)
            yield _batch(self.samples, self.objective, self.seed, _VALIDATION, [(i, i) for i in indices])


def build_data(
    data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer: Tokenizer | None = None
) -> tuple[TokenSource, ValidationSource | None]:
    """The training stream and (unless data.validation is null) the validation batches of a recipe, after
    checking the files exist, match the tokenizer, and that the tokenizer fits model.vocab_size."""
    tokenizer = tokenizer if tokenizer is not None else Tokenizer(data_cfg.tokenizer)
    _check_vocab(tokenizer, model_cfg)
    objective = make_objective(data_cfg, tokenizer)
    train = TokenSource(data_cfg.train, data_cfg.seq_len, objective, data_cfg.seed)
    _check_samples(train.samples, tokenizer)
    if data_cfg.validation is None:
        return train, None
    val = ValidationSource(data_cfg.validation, data_cfg.seq_len, objective, data_cfg.seed)
    _check_samples(val.samples, tokenizer)
    return train, val


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


def _check_samples(samples: PackedSamples, tokenizer: Tokenizer) -> None:
    built_with = samples.meta.get("tokenizer_sha256")
    if built_with is not None and built_with != tokenizer.sha256:
        raise ConfigError(
            None,
            "data.tokenizer",
            str(tokenizer.path),
            f"is not the tokenizer {samples.key}={samples.path} was built with (sha256 differs)",
            f"point data.tokenizer at the tokenizer used for {samples.path}, or rebuild it (`make data`)",
        )
    if len(samples) == 0:
        raise ConfigError(
            None,
            "data.seq_len",
            samples.seq_len,
            f"{samples.key}={samples.path} holds {len(samples.tokens)} tokens, "
            f"fewer than one sample of {samples.sample_len}",
            "lower data.seq_len or use a bigger token file",
        )
