"""Loom's data layer: the demo corpus and tokenizer, packed token files, objectives and batch streams.

See docs/contracts.md for the batch format. Entry point for training: `build_data(data_cfg, model_cfg)`.
"""

from framework.data.demo import DEFAULT_VOCAB_SIZE, build_demo_data
from framework.data.objectives import (
    IGNORE_INDEX,
    causal_lm,
    corrupt_spans,
    document_ids_from_eos,
    masked_lm,
    noise_span_counts,
    prefix_lm,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
)
from framework.data.source import (
    Objective,
    PackedSamples,
    TokenSource,
    ValidationSource,
    build_data,
    make_objective,
)
from framework.data.token_file import open_tokens, read_sidecar, write_token_file
from framework.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "Objective",
    "PackedSamples",
    "TokenSource",
    "Tokenizer",
    "ValidationSource",
    "build_data",
    "build_demo_data",
    "causal_lm",
    "corrupt_spans",
    "document_ids_from_eos",
    "make_objective",
    "masked_lm",
    "noise_span_counts",
    "open_tokens",
    "prefix_lm",
    "random_spans_noise_mask",
    "read_sidecar",
    "span_corruption",
    "span_corruption_lengths",
    "train_tokenizer",
    "write_token_file",
]
