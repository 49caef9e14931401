"""Training objectives: pure functions from token ids (and a torch.Generator) to a batch (docs/contracts.md).

Every function takes a [B, L] integer tensor and returns a dict of long tensors with `input_ids` and `labels`
(-100 = ignored) plus what the objective needs (`prefix_lengths`, `decoder_input_ids`). Randomness comes only
from the generator passed in, so the same tokens and generator state give the same batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100
Batch = dict[str, Tensor]


def causal_lm(tokens: Tensor) -> Batch:
    """Next-token prediction: tokens [B, S+1] -> input_ids = tokens[:, :-1], labels = tokens[:, 1:]."""
    tokens = tokens.long()
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def prefix_lm(tokens: Tensor, generator: torch.Generator) -> Batch:
    """Prefix LM: tokens [B, S+1]; each row gets a prefix of p ~ uniform{1..S-1} input tokens that every
    position sees (bidirectional), with causal attention after it (`prefix_lengths` [B] tells the model).

    A label is ignored exactly when the token it names lies inside the prefix: labels[:, i] names token i+1,
    which for i+1 < p is a prefix key visible to position i (predicting it would be copying). Position p-1 keeps
    its label, the first token after the prefix, which it cannot see.
    """
    batch = causal_lm(tokens)
    rows, length = batch["input_ids"].shape
    if length < 2:
        raise ValueError(f"prefix_lm needs at least 2 input tokens, got {length}")
    prefix = torch.randint(1, length, (rows,), generator=generator)
    inside = torch.arange(length)[None, :] < (prefix[:, None] - 1)
    batch["labels"] = batch["labels"].masked_fill(inside, IGNORE_INDEX)
    batch["prefix_lengths"] = prefix
    return batch


def masked_lm(
    tokens: Tensor,
    generator: torch.Generator,
    mask_id: int,
    vocab_size: int,
    special_ids: Collection[int],
    probability: float = 0.15,
) -> Batch:
    """BERT masked LM on tokens [B, S]: each non-special token is selected with `probability`; a selected token
    becomes `mask_id` (80%), a random non-special token (10%) or stays itself (10%). Labels are the original
    tokens at selected positions and -100 elsewhere. Special ids (and mask_id) are never selected or drawn."""
    tokens = tokens.long()
    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[torch.tensor(sorted({*special_ids, mask_id}), dtype=torch.long)] = True
    # Draw every random tensor unconditionally, so the generator advances the same way for any input.
    selected = (torch.rand(tokens.shape, generator=generator) < probability) & ~special[tokens]
    action = torch.rand(tokens.shape, generator=generator)
    ordinary = torch.nonzero(~special).squeeze(1)
    random_ids = ordinary[torch.randint(len(ordinary), tokens.shape, generator=generator)]
    inputs = torch.where(selected & (action < 0.8), mask_id, tokens)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "labels": torch.where(selected, tokens, IGNORE_INDEX)}


def noise_span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length`, as T5's random_spans_noise_mask computes them:
    round(length * density) noise tokens (at least 1, at most length-1), round(noise / mean_span_length) spans
    (at least 1). Python's round() rounds halves to even, like tf.math.round. Spans are also capped so that every
    span and every gap between them is at least one token long."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def span_corruption_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(input length, target length) of span_corruption on sequences of `length`, identical for every row:
    inputs keep the non-noise tokens plus one sentinel per span plus eos; targets hold the noise tokens plus one
    sentinel per span plus eos."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_segmentation(num_items: int, num_segments: int, rows: int, generator: torch.Generator) -> Tensor:
    """Lengths [rows, num_segments] of a uniformly random split of `num_items` items into `num_segments`
    non-empty consecutive segments: num_segments - 1 distinct cut points among the num_items - 1 gaps."""
    ranks = torch.rand(rows, num_items - 1, generator=generator).argsort(dim=1)
    starts_segment = torch.cat([torch.zeros(rows, 1, dtype=torch.bool), ranks < num_segments - 1], dim=1)
    segment = starts_segment.long().cumsum(dim=1)
    lengths = torch.zeros(rows, num_segments, dtype=torch.long)
    return lengths.scatter_add_(1, segment, torch.ones_like(segment))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rows: int, generator: torch.Generator
) -> Tensor:
    """T5's noise mask [rows, length] (True = noise): the counts of `noise_span_counts`, noise and non-noise
    tokens each randomly segmented into that many spans, interleaved non-noise first (so a row ends in noise)."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_span_length)
    noise_lengths = random_segmentation(num_noise, num_spans, rows, generator)
    kept_lengths = random_segmentation(length - num_noise, num_spans, rows, generator)
    span_ends = torch.stack([kept_lengths, noise_lengths], dim=2).reshape(rows, 2 * num_spans).cumsum(dim=1)
    positions = torch.arange(length).expand(rows, length).contiguous()
    span_index = torch.searchsorted(span_ends, positions, right=True)
    return span_index % 2 == 1


def span_corruption(
    tokens: Tensor,
    generator: torch.Generator,
    noise_density: float,
    mean_span_length: float,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
) -> Batch:
    """T5 span corruption on tokens [B, L] with a random_spans_noise_mask; see `corrupt_spans` for the outputs.
    Shapes are fixed by `span_corruption_lengths(L, ...)`."""
    rows, length = tokens.shape
    noise = random_spans_noise_mask(length, noise_density, mean_span_length, rows, generator)
    input_length, target_length = span_corruption_lengths(length, noise_density, mean_span_length)
    return corrupt_spans(tokens, noise, sentinel_ids, eos_id, pad_id, input_length, target_length)


def corrupt_spans(
    tokens: Tensor,
    noise: Tensor,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
    input_length: int | None = None,
    target_length: int | None = None,
) -> Batch:
    """Encoder inputs and decoder targets for tokens [B, L] and a noise mask [B, L] (True = corrupted).

    input_ids: the tokens with the k-th noise span of the row replaced by sentinel_ids[k], then eos.
    labels: for each noise span, its sentinel followed by its tokens; then eos.
    decoder_input_ids: the targets shifted right, starting with pad_id (T5's decoder start token).
    Rows shorter than the output length (default: the longest row) are padded with pad_id; padded labels -100.
    """
    tokens = tokens.long()
    previous = torch.nn.functional.pad(noise[:, :-1], (1, 0), value=False)
    span_starts = noise & ~previous
    span_number = span_starts.long().cumsum(dim=1) - 1
    most_spans = int(span_number[:, -1].max()) + 1 if span_number.numel() else 0
    if most_spans > len(sentinel_ids):
        raise ValueError(
            f"a row has {most_spans} noise spans but only {len(sentinel_ids)} sentinel ids are given"
        )
    # Positions before a row's first span have span_number -1; their (unused) sentinel is any valid id.
    table = torch.tensor([*sentinel_ids, pad_id], dtype=torch.long)
    sentinels = table[span_number.clamp(min=0)]
    eos = torch.full((tokens.shape[0], 1), eos_id, dtype=torch.long)
    keep_all = torch.ones_like(eos, dtype=torch.bool)
    # Inputs: one slot per position (the token, or the span's sentinel at its first position), plus eos.
    inputs, _ = _compact(
        torch.cat([torch.where(span_starts, sentinels, tokens), eos], dim=1),
        torch.cat([~noise | span_starts, keep_all], dim=1),
        input_length,
        pad_id,
    )
    # Targets: two slots per position (the sentinel where a span starts, then the noise token), plus eos.
    targets, target_count = _compact(
        torch.cat([torch.stack([sentinels, tokens], dim=2).flatten(1), eos], dim=1),
        torch.cat([torch.stack([span_starts, noise], dim=2).flatten(1), keep_all], dim=1),
        target_length,
        pad_id,
    )
    padded = torch.arange(targets.shape[1])[None, :] >= target_count[:, None]
    decoder_inputs = torch.nn.functional.pad(targets[:, :-1], (1, 0), value=pad_id)
    return {
        "input_ids": inputs,
        "labels": targets.masked_fill(padded, IGNORE_INDEX),
        "decoder_input_ids": decoder_inputs,
    }


def _compact(values: Tensor, keep: Tensor, length: int | None, fill: int) -> tuple[Tensor, Tensor]:
    """Left-align the kept values of each row (order preserved) into rows of `length` (default: the most kept
    in any row), filled with `fill`; also return how many each row kept."""
    counts = keep.sum(dim=1)
    length = int(counts.max()) if length is None else length
    if int(counts.max()) > length:
        raise ValueError(f"a row needs {int(counts.max())} positions, more than the output length {length}")
    # Dropped values go to an extra last column, cut off afterwards.
    where = torch.where(keep, keep.long().cumsum(dim=1) - 1, length)
    out = torch.full((values.shape[0], length + 1), fill, dtype=torch.long)
    return out.scatter_(1, where, values)[:, :length], counts
