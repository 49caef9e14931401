"""Loom's model zoo: decoder (causal LM), encoder (masked LM) and encoder-decoder (T5) transformers."""

from framework.models.init import init_groups, init_weights
from framework.models.transformer import EncoderDecoder, Transformer, build_model

__all__ = ["EncoderDecoder", "Transformer", "build_model", "init_groups", "init_weights"]
