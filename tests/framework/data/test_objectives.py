"""Each objective against its definition (docs/contracts.md; BERT for masked LM; T5 for span corruption)."""

from __future__ import annotations

import pytest
import torch

from framework.data.objectives import (
    IGNORE_INDEX,
    causal_lm,
    corrupt_spans,
    masked_lm,
    noise_span_counts,
    prefix_lm,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
)

VOCAB = 1000
PAD, EOS, MASK = 0, 1, 4
SENTINELS = tuple(range(99, 35, -1))  # 64 descending ids, like T5's <extra_id_0> = highest
SPECIALS = frozenset({0, 1, 2, 3, MASK, *SENTINELS})
FIRST_ORDINARY = 100


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ordinary_tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY, VOCAB, (rows, length), generator=gen(seed))


def test_causal_lm_shifts_by_one() -> None:
    tokens = torch.arange(20).reshape(2, 10)
    batch = causal_lm(tokens)
    assert torch.equal(batch["input_ids"], tokens[:, :-1])
    assert torch.equal(batch["labels"], tokens[:, 1:])
    assert batch["input_ids"].dtype == torch.long and set(batch) == {"input_ids", "labels"}


def test_prefix_lm_ignores_labels_exactly_inside_the_prefix() -> None:
    tokens = ordinary_tokens(64, 33)
    batch = prefix_lm(tokens, gen(1))
    prefix = batch["prefix_lengths"]
    assert prefix.shape == (64,) and int(prefix.min()) >= 1 and int(prefix.max()) <= 31
    assert len(set(prefix.tolist())) > 10  # random per row
    for row, p in enumerate(prefix.tolist()):
        labels = batch["labels"][row]
        # labels[i] names token i+1: ignored iff token i+1 is one of the prefix tokens 0..p-1.
        assert (labels[: p - 1] == IGNORE_INDEX).all()
        assert torch.equal(labels[p - 1 :], tokens[row, p:])
    assert torch.equal(batch["input_ids"], tokens[:, :-1])


def test_masked_lm_rates_and_labels() -> None:
    tokens = ordinary_tokens(64, 512)
    tokens[:, ::10] = EOS  # specials sprinkled in: never selected
    tokens[:, 5::50] = SENTINELS[0]
    batch = masked_lm(tokens, gen(2), MASK, VOCAB, SPECIALS, probability=0.15)
    inputs, labels = batch["input_ids"], batch["labels"]
    selected = labels != IGNORE_INDEX
    candidates = ~torch.isin(tokens, torch.tensor(sorted(SPECIALS)))
    assert not (selected & ~candidates).any()
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    n = int(selected.sum())
    assert abs(n / int(candidates.sum()) - 0.15) < 0.01  # ~4400 of ~29500: 3 sigma is 0.006
    masked = (inputs == MASK) & selected
    kept = (inputs == tokens) & selected
    replaced = selected & ~masked & ~kept
    assert abs(int(masked.sum()) / n - 0.8) < 0.025
    assert abs(int(replaced.sum()) / n - 0.1) < 0.02
    assert abs(int(kept.sum()) / n - 0.1) < 0.02
    assert not torch.isin(inputs[replaced], torch.tensor(sorted(SPECIALS))).any()


def test_noise_span_counts_follow_the_t5_formula() -> None:
    for length, density, mean in [(100, 0.15, 3.0), (256, 0.15, 3.0), (512, 0.15, 3.0), (37, 0.5, 2.0)]:
        noise, spans = noise_span_counts(length, density, mean)
        assert noise == round(length * density) and spans == round(noise / mean)
        mask = random_spans_noise_mask(length, density, mean, 16, gen(3))
        assert (mask.sum(dim=1) == noise).all()
        starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))
        assert (starts.sum(dim=1) == spans).all()
        assert not mask[:, 0].any() and mask[:, -1].all()  # non-noise first, noise last (T5)


def reconstruct(inputs: list[int], targets: list[int], sentinels: tuple[int, ...]) -> list[int]:
    """Undo span corruption: replace each sentinel of the inputs by the tokens after it in the targets."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in sentinels:
            current = spans.setdefault(token, [])
        elif token == EOS:
            break
        else:
            current.append(token)
    out: list[int] = []
    for token in inputs:
        if token == EOS:
            break
        out.extend(spans[token] if token in sentinels else [token])
    return out


def test_span_corruption_reconstructs_the_tokens() -> None:
    tokens = ordinary_tokens(8, 256)
    batch = span_corruption(tokens, gen(4), 0.15, 3.0, SENTINELS, EOS, PAD)
    input_length, target_length = span_corruption_lengths(256, 0.15, 3.0)
    assert batch["input_ids"].shape == (8, input_length) and batch["labels"].shape == (8, target_length)
    _, spans = noise_span_counts(256, 0.15, 3.0)
    for row in range(8):
        inputs, targets = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert reconstruct(inputs, targets, SENTINELS) == tokens[row].tolist()
        assert [t for t in inputs if t in SENTINELS] == list(SENTINELS[:spans])  # distinct, in order
        assert [t for t in targets if t in SENTINELS] == list(SENTINELS[:spans])
        assert inputs[-1] == EOS and targets[-1] == EOS and targets[0] == SENTINELS[0]
    assert (batch["labels"] != IGNORE_INDEX).all()  # the formula fixes the lengths: no padding needed
    expected_decoder = torch.cat([torch.full((8, 1), PAD), batch["labels"][:, :-1]], dim=1)
    assert torch.equal(batch["decoder_input_ids"], expected_decoder)


def test_corrupt_spans_pads_uneven_rows() -> None:
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    noise = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    batch = corrupt_spans(tokens, noise, SENTINELS, EOS, PAD)
    s0, s1 = SENTINELS[0], SENTINELS[1]
    assert batch["input_ids"].tolist() == [[10, s0, 13, 14, s1, EOS, PAD], [20, 21, 22, 23, s0, 25, EOS]]
    assert batch["labels"].tolist() == [[s0, 11, 12, s1, 15, EOS], [s0, 24, EOS, -100, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[PAD, s0, 11, 12, s1, 15], [PAD, s0, 24, EOS, PAD, PAD]]


def test_span_corruption_needs_enough_sentinels() -> None:
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(ordinary_tokens(1, 256), gen(0), 0.15, 3.0, SENTINELS[:4], EOS, PAD)


@pytest.mark.parametrize("objective", ["prefix", "mlm", "span"])
def test_objectives_are_deterministic_in_the_generator(objective: str) -> None:
    tokens = ordinary_tokens(4, 129)

    def run(seed: int) -> dict[str, torch.Tensor]:
        if objective == "prefix":
            return prefix_lm(tokens, gen(seed))
        if objective == "mlm":
            return masked_lm(tokens, gen(seed), MASK, VOCAB, SPECIALS)
        return span_corruption(tokens, gen(seed), 0.15, 3.0, SENTINELS, EOS, PAD)

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
