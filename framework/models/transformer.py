"""The three model families, built from one stack class.

`Transformer` is a stack of blocks with its optional embeddings and LM head. As a whole model it is the
decoder (causal LM, GPT/Llama) or the encoder (masked LM, BERT); inside `EncoderDecoder` (T5) it is the
encoder or decoder stack, built without token embeddings and head. Optional modules are looked up at forward
time, so a pipeline stage may delete them: without `tok_embeddings` the input is already hidden states, without
`output` (and without a tied head) hidden states are returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig
from framework.models.attention import Attention, AttentionContext, softcap
from framework.models.masks import AttentionMask
from framework.models.mixers import local_config, mixer_of
from framework.models.mlp import FeedForward, activation
from framework.models.moe import MoE
from framework.models.mtp import MTPLayer, mtp_block_index, shifted_ids
from framework.models.norms import build_norm
from framework.models.positions import (
    RelativePositionBias,
    SinusoidalEmbedding,
    default_positions,
    rope_angles,
    rope_table,
)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention (T5 decoder), feed-forward; each a residual branch.
    pre-norm: x + f(norm(x)) (GPT-2, Llama, T5); post-norm: norm(x + f(x)) (Vaswani et al., BERT); reordered:
    x + norm(f(x)) (OLMo 2); sandwich:
    x + post_norm(f(norm(x))) (Gemma 2; self-attention and feed-forward only, as `*_post_norm`)."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False, index: int = 0) -> None:
        """index: the block's position in its stack (decides its mixer and whether its feed-forward is MoE)."""
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.reordered = cfg.norm_position == "reordered"
        mixer = mixer_of(cfg, index) if not cross_attention else mixer_of(cfg, 0)
        self.mixer_attr = mixer.attr
        """The attribute holding this block's sequence mixer (framework/models/mixers.py)."""
        self.context_kind = mixer.context
        self.attention_norm = build_norm(cfg)
        setattr(self, mixer.attr, mixer.build(local_config(cfg) if mixer.context == "local" else cfg))
        if cfg.sandwich_norm:
            self.attention_post_norm = build_norm(cfg)
        if cross_attention:
            self.cross_attention_norm = build_norm(cfg)
            self.cross_attention = Attention(cfg, cross=True)
        if cfg.layers is None or cfg.layers.feed_forward:
            self.ffn_norm = build_norm(cfg)
            self.feed_forward = MoE(cfg) if cfg.is_moe_layer(index) else FeedForward(cfg)
            if cfg.sandwich_norm:
                self.ffn_post_norm = build_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def mixer(self) -> nn.Module:
        """This block's sequence mixer (attention, gdn or mamba, by model.layers.pattern)."""
        return getattr(self, self.mixer_attr)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        memory: torch.Tensor | None = None,
        memory_ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        attention_post = _optional(self, "attention_post_norm")
        mixer = self.mixer
        x = self._residual(x, self.attention_norm, lambda h: mixer(h, ctx), attention_post)
        if hasattr(self, "cross_attention"):
            if memory is None or memory_ctx is None:
                raise ValueError("a block with cross-attention needs the encoder output (memory)")
            attend = self.cross_attention
            x = self._residual(x, self.cross_attention_norm, lambda h: attend(h, memory_ctx, memory))
        if not hasattr(self, "feed_forward"):
            return x
        return self._residual(x, self.ffn_norm, self.feed_forward, _optional(self, "ffn_post_norm"))

    def _residual(
        self,
        x: torch.Tensor,
        norm: nn.Module,
        branch: Callable[[torch.Tensor], torch.Tensor],
        post_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        if post_norm is not None:
            return x + self.dropout(post_norm(branch(norm(x))))
        if self.pre_norm:
            return x + self.dropout(branch(norm(x)))
        if self.reordered:  # OLMo 2: the branch's output is normalised, its input is the raw residual stream
            return x + self.dropout(norm(branch(x)))
        return norm(x + self.dropout(branch(x)))


class HeadTransform(nn.Module):
    """BERT masked-LM head transform: dense (d -> d), the MLP's activation, norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)  # BERT's transform always has a bias
        self.act = activation(cfg)
        self.norm = build_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


def _optional(module: nn.Module, name: str) -> nn.Module | None:
    """A child that may have been deleted (or set to None) by a pipeline stage."""
    return getattr(module, name, None)


def _add_embeddings(model: nn.Module, cfg: ModelConfig) -> None:
    """Input modules of a whole model: token, position and type tables, embed_norm, embedding dropout."""
    model.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
    if cfg.position == "learned":
        model.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model)
    elif cfg.position == "sinusoidal":
        model.pos_embeddings = SinusoidalEmbedding(cfg.d_model)
    if cfg.type_vocab_size > 0:
        model.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
    if cfg.embedding_norm:
        model.embed_norm = build_norm(cfg)
    model.dropout = nn.Dropout(cfg.dropout)


def embed(
    model: nn.Module,
    x: torch.Tensor,
    positions: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token + position + type embeddings, embed_norm, dropout. Without `tok_embeddings`, or when x is already
    floating point (a later pipeline stage; the last one keeps a tied embedding for its head), x holds hidden
    states and is returned unchanged."""
    tokens = _optional(model, "tok_embeddings")
    if tokens is None or x.is_floating_point():
        return x
    h = tokens(x)
    if model.cfg.embedding_scale == "sqrt_d_model":
        # the factor is rounded to h's dtype first, as Gemma does (sqrt(3072) = 55.43 becomes 55.5 in bf16);
        # rounded on the host, so no tensor is copied to the device per forward
        h = h * torch.tensor(model.cfg.d_model**0.5, dtype=h.dtype).item()
    pos = _optional(model, "pos_embeddings")
    if pos is not None:
        h = h + pos(positions).to(h.dtype)
    types = _optional(model, "type_embeddings")
    if types is not None:
        h = h + types(token_type_ids if token_type_ids is not None else torch.zeros_like(positions))
    norm = _optional(model, "embed_norm")
    if norm is not None:
        h = norm(h)
    return model.dropout(h)


def _add_head(model: nn.Module, cfg: ModelConfig) -> None:
    """head_transform (BERT) and the output projection; a tied head keeps only its bias (`output_bias`)."""
    if cfg.mlm_head_transform:
        model.head_transform = HeadTransform(cfg)
    if not cfg.tie_embeddings:
        model.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.output_bias)
    elif cfg.output_bias:
        model.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))


def lm_head(model: nn.Module, h: torch.Tensor, holds_last_layer: bool) -> torch.Tensor:
    """Logits from the last hidden states, or the hidden states themselves when this module has no head.

    A tied head (no `output`) uses tok_embeddings.weight, but only in a module that also holds the last block,
    so a first pipeline stage that keeps the embeddings still returns hidden states."""
    transform = _optional(model, "head_transform")
    if transform is not None:
        h = transform(h)
    output = _optional(model, "output")
    if output is not None:
        return softcap(output(h), model.cfg.final_logit_softcap)
    embeddings = _optional(model, "tok_embeddings")
    if model.cfg.tie_embeddings and embeddings is not None and holds_last_layer:
        logits = F.linear(h, embeddings.weight, _optional(model, "output_bias"))
        return softcap(logits, model.cfg.final_logit_softcap)
    return h


def _check_length(cfg: ModelConfig, seq_len: int) -> None:
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"sequence length {seq_len} > model.max_seq_len={cfg.max_seq_len}")


class Transformer(nn.Module):
    """A stack of blocks. As a whole model (`whole=True`): the decoder (causal LM) or encoder (masked LM)
    family, with embeddings and head; inside EncoderDecoder: a T5 stack that maps hidden states to hidden
    states."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        causal: bool,
        n_layers: int,
        cross_attention: bool = False,
        whole: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.n_layers = n_layers
        self.whole = whole
        self.rope_table = rope_table(cfg)
        """RoPE frequencies kept per device: a forward after the first copies nothing host-to-device."""
        self.local_cfg = local_config(cfg)
        self.local_rope_table = rope_table(self.local_cfg)
        """attention_local blocks' frequencies (model.layers.local_rope_theta)."""
        self.full_attention = {str(i) for i in cfg.full_attention_layers or ()}
        """Names of the blocks exempt from the sliding window (model.full_attention_layers)."""
        if whole:
            _add_embeddings(self, cfg)
        if cfg.position == "relative_bias":
            # decoders look only backwards, so their buckets are unidirectional (T5)
            self.relative_bias = RelativePositionBias(cfg, bidirectional=not causal)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, cross_attention=cross_attention, index=i) for i in range(n_layers)}
        )
        if cfg.has_final_norm:
            self.norm = build_norm(cfg)
        if whole:
            _add_head(self, cfg)
        if whole and cfg.mtp is not None:
            self.mtp = nn.ModuleList(
                MTPLayer(cfg, k, TransformerBlock(cfg, index=mtp_block_index(cfg, k)))
                for k in range(1, cfg.mtp.depth + 1)
            )
        self.mtp_logits: list[torch.Tensor] | None = None
        """Training forwards of a model with `mtp`: the logits of each depth (framework/models/mtp.py), read and
        released by the loss (framework/train/mtp_loss.py); None otherwise."""

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        mtp_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S] (or hidden states [B, S, D]) -> logits [B, S, vocab] (or hidden states).
        `memory` [B, Sk, D] is the encoder output for a stack with cross-attention. In training, a model with
        `mtp` also stashes each depth's logits in `mtp_logits`; their token ids are `mtp_input_ids` (a pipeline's
        last stage, whose input is hidden states), else input_ids."""
        if decoder_input_ids is not None:
            raise ValueError(f"decoder_input_ids is only for family encoder_decoder, not {self.cfg.family}")
        batch, seq_len = input_ids.shape[:2]
        _check_length(self.cfg, seq_len)
        if positions is None:
            positions = default_positions(batch, seq_len, input_ids.device, document_ids)
        h = embed(self, input_ids, positions, token_type_ids) if self.whole else input_ids
        ctx = self._context(positions, document_ids, prefix_lengths)
        memory_ctx = AttentionContext() if memory is not None else None
        contexts = {"global": ctx, "full": self._full_attention_context(ctx) or ctx}
        if any(block.context_kind == "local" for block in self._blocks()):
            contexts["local"] = self._context(positions, document_ids, prefix_lengths, local=True)
        for name, layer in self.layers.items():
            kind = "full" if name in self.full_attention else layer.context_kind
            h = layer(h, contexts[kind], memory, memory_ctx)
        norm = _optional(self, "norm")
        if norm is not None:
            h = norm(h)
        if not self.whole:
            return h
        holds_last = str(self.n_layers - 1) in self.layers
        self.mtp_logits = None
        if self.training and holds_last and _optional(self, "mtp") is not None:
            ids = mtp_input_ids if mtp_input_ids is not None else input_ids
            self.mtp_logits = self._mtp_logits(h, ids, contexts)
        return lm_head(self, h, holds_last)

    def _blocks(self) -> list[TransformerBlock]:
        """The main stack's blocks this module holds, then the MTP depths' blocks."""
        mtp = _optional(self, "mtp")
        return [*self.layers.values(), *(layer.block for layer in mtp or ())]

    def _mtp_logits(
        self, h: torch.Tensor, input_ids: torch.Tensor, contexts: dict[str, AttentionContext]
    ) -> list[torch.Tensor]:
        """Logits of every MTP depth from h^0 = the main stack's normed output (framework/models/mtp.py)."""
        if input_ids.is_floating_point():
            raise ValueError("multi-token prediction needs token ids: pass mtp_input_ids to this stage")
        embeddings = _optional(self, "tok_embeddings")
        if embeddings is None:
            raise RuntimeError("multi-token prediction needs tok_embeddings on the module holding `mtp`")
        logits = []
        for layer in self.mtp:
            h = layer(embeddings(shifted_ids(input_ids, layer.depth)), h, contexts[layer.block.context_kind])
            logits.append(lm_head(self, h, True))
        return logits

    def _context(
        self,
        positions: torch.Tensor,
        document_ids: torch.Tensor | None,
        prefix_lengths: torch.Tensor | None,
        local: bool = False,
    ) -> AttentionContext:
        """The stack's context, or with local=True the attention_local blocks' (their window and RoPE)."""
        cfg = self.local_cfg if local else self.cfg
        table = self.local_rope_table if local else self.rope_table
        mask = AttentionMask(
            causal=self.causal,
            window=cfg.sliding_window if self.causal else None,
            prefix_lengths=prefix_lengths if self.causal else None,
            q_documents=document_ids,
            k_documents=document_ids,
        )
        rope = rope_angles(cfg, positions, table) if cfg.position == "rope" else None
        return AttentionContext(
            mask, positions=positions, rope=rope, position_bias=self._relative_bias(positions)
        )

    def _full_attention_context(self, ctx: AttentionContext) -> AttentionContext | None:
        """ctx without the window, for the blocks in model.full_attention_layers (its masks are built once
        per forward too); None when every block is windowed alike."""
        if not self.full_attention or ctx.mask.window is None:
            return None
        mask = dataclasses.replace(ctx.mask, window=None)
        return AttentionContext(mask, positions=ctx.positions, rope=ctx.rope, position_bias=ctx.position_bias)

    def _relative_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """T5 bias computed once per forward and shared by all blocks of this stack."""
        if self.cfg.position != "relative_bias":
            return None
        table = _optional(self, "relative_bias")
        if table is None:
            raise RuntimeError("position relative_bias needs this stack's `relative_bias` module")
        return table.bias(positions, positions)


class EncoderDecoder(nn.Module):
    """T5: shared input embeddings, a bidirectional encoder stack, a causal decoder stack with cross-attention
    to the encoder output, and the LM head over decoder positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        _add_embeddings(self, cfg)
        self.encoder = Transformer(cfg, causal=False, n_layers=cfg.n_layers, whole=False)
        self.decoder = Transformer(
            cfg, causal=True, n_layers=cfg.decoder_layers, cross_attention=True, whole=False
        )
        _add_head(self, cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder inputs [B, S] -> logits over decoder positions [B, T, vocab]. positions, document_ids and
        token_type_ids describe the encoder input (the decoder counts 0..T-1); prefix_lengths has no effect
        (the encoder already sees everything)."""
        if decoder_input_ids is None:
            raise ValueError("family encoder_decoder needs decoder_input_ids")
        batch, seq_len = input_ids.shape[:2]
        _check_length(self.cfg, seq_len)
        _check_length(self.cfg, decoder_input_ids.shape[1])
        if positions is None:
            positions = default_positions(batch, seq_len, input_ids.device, document_ids)
        source = embed(self, input_ids, positions, token_type_ids)
        memory = self.encoder(source, positions=positions, document_ids=document_ids)
        target_positions = default_positions(batch, decoder_input_ids.shape[1], decoder_input_ids.device)
        h = self.decoder(embed(self, decoder_input_ids, target_positions), memory=memory)
        return lm_head(self, h, True)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of cfg.family on the current default device (use `with torch.device("meta")` for large ones,
    then `to_empty` and `init_weights`). Weights hold PyTorch's default init until init_weights runs."""
    cfg.validate()
    if cfg.family == "encoder_decoder":
        return EncoderDecoder(cfg)
    return Transformer(cfg, causal=cfg.causal, n_layers=cfg.n_layers)
