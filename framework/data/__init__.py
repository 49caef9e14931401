"""Loom's data layer: tokenizers, offline packing into webdataset shards, the deterministic sample order,
mixtures, objectives and batch streams, and the bundled demo corpus.

See docs/data.md for the formats and the determinism contract, docs/contracts.md for the batch format.
Entry point for training: `build_data(data_cfg, model_cfg)`; for preparing data: framework.data.prepare.prepare(...).
"""

from framework.data.demo import DEFAULT_VOCAB_SIZE, build_demo_data
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
from framework.data.order import SampleOrder
from framework.data.shards import PreparedSplit, read_manifest
from framework.data.source import (
    Objective,
    TrainSource,
    ValidationSource,
    build_data,
    make_objective,
)
from framework.data.tokenizer import Tokenizer, train_tokenizer, train_tokenizer_on_files

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "Objective",
    "PreparedSplit",
    "SampleOrder",
    "Tokenizer",
    "TrainSource",
    "ValidationSource",
    "build_data",
    "build_demo_data",
    "causal_lm",
    "corrupt_spans",
    "make_objective",
    "masked_lm",
    "noise_span_counts",
    "prefix_lm",
    "random_spans_noise_mask",
    "read_manifest",
    "span_corruption",
    "span_corruption_lengths",
    "train_tokenizer",
    "train_tokenizer_on_files",
]
