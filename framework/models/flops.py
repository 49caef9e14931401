"""Parameter counts and the one FLOP formula of Loom, as pure functions of the model config.

Conventions (see docs/flops.md for the derivation and a worked example):

* One multiply-accumulate = 2 FLOPs. Only matrix multiplies are counted: element-wise work (norms, activations,
  softmax, biases, RoPE, position biases, dropout) and embedding lookups are not (Kaplan et al. 2020, table 1;
  PaLM appendix B; Megatron-LM's MFU formula, Narayanan et al. 2021).
* Forward matmul FLOPs per token = 2 x (weight-matrix parameters touched by that token), output head included
  (also when it is tied to the token embedding: the lookup is free, the head matmul is not).
* Attention scores (q.k) and values (p.v) add 2 x 2 x n_heads x head_dim x (mean keys attended per query) per
  layer (PaLM appendix B, with the mask's real key count instead of the full sequence):
  bidirectional = seq_len, causal = (seq_len + 1) / 2, causal sliding window W = mean over i of min(i + 1, W)
  (blocks in full_attention_layers: causal).
  GQA shrinks the k/v projections, not this term (every query head still scores every key it sees).
* Training = 3 x forward (the backward pass costs two forwards: input grads and weight grads; Kaplan et al. 2020,
  section 2.1; Chinchilla appendix F).
* encoder_decoder: FLOPs per token = FLOPs of one example (encoder length seq_len, decoder length decoder_len)
  divided by (seq_len + decoder_len), i.e. per source + target token. The encoder is bidirectional, decoder
  self-attention causal, and cross-attention attends to every encoder position; the cross-attention k/v
  projections run over the encoder tokens once per decoder layer.

Multi-token prediction (model.mtp, DeepSeek-V3): each depth adds its block (index n_layers + k - 1, so its mixer and
MoE-ness follow the layer rules), eh_proj (2d x d) and one more output-head matmul per token. They run in every
training forward, so the counts here include them; an evaluation forward skips them (counted all the same).

The count ignores document masking and prefix-LM masks (the formula is a property of the config, not the batch):
a decoder is always counted as causal, so packed documents make the real work slightly smaller.
"""

from __future__ import annotations

from framework.config.schema import ModelConfig
from framework.models import mixers

GATED_MLPS = ("swiglu", "geglu", "clamped_swiglu")


# --------------------------------------------------------------------------------------------- parameter counts
def _norm_params(cfg: ModelConfig, dim: int) -> int:
    """RMSNorm has a gain; LayerNorm a gain and a bias."""
    return dim if cfg.norm == "rmsnorm" else 2 * dim


def _mlp_matrices(cfg: ModelConfig) -> int:
    """Gated MLPs (SwiGLU/GeGLU; Shazeer 2020) have w1, w3 and w2; plain ReLU/GELU MLPs w1 and w2."""
    return 3 if cfg.mlp in GATED_MLPS else 2


def _attention_matrix_params(cfg: ModelConfig) -> int:
    return mixers.attention_matrix_params(cfg)


def attention_params(cfg: ModelConfig, *, cross: bool = False) -> int:
    """One attention module: projections, their biases, qk-norm and the soft-masking scalars per head
    (the soft distance weight exists in self-attention only)."""
    hd, heads, kv = cfg.resolved_head_dim, cfg.n_heads, cfg.resolved_kv_heads
    total = _attention_matrix_params(cfg)
    if cfg.bias:
        total += heads * hd + 2 * kv * hd
    if cfg.dense_bias:
        total += cfg.d_model  # wo's bias (absent with bias_scope qkv)
    if cfg.qk_norm and cfg.qk_norm_scope == "projection":
        total += _norm_params(cfg, heads * hd) + _norm_params(
            cfg, kv * hd
        )  # over the whole projections (OLMo 2)
    elif cfg.qk_norm:
        total += 2 * _norm_params(cfg, hd)  # q_norm and k_norm act per head, shared by the heads
    total += heads * int(cfg.learned_temperature)
    total += heads * int(cfg.attention_sinks and not cross)  # one sink logit per head (gpt-oss)
    return total + heads * int(cfg.soft_distance_bias and not cross)


def _mlp_matrix_params(cfg: ModelConfig) -> int:
    return _mlp_matrices(cfg) * cfg.d_model * cfg.ffn_hidden


def _mlp_params(cfg: ModelConfig) -> int:
    total = _mlp_matrix_params(cfg)
    if cfg.dense_bias:
        total += (_mlp_matrices(cfg) - 1) * cfg.ffn_hidden + cfg.d_model
    return total


def _expert_matrix_params(cfg: ModelConfig) -> int:
    """One routed expert's matrices: the model's MLP type at width moe.expert_hidden."""
    assert cfg.moe is not None
    return _mlp_matrices(cfg) * cfg.d_model * cfg.moe.resolved_expert_hidden(cfg.ffn_hidden)


def _expert_params(cfg: ModelConfig) -> int:
    """One routed expert: its matrices and, with moe.expert_linear_bias (gpt-oss), a bias per hidden unit of
    each input matrix and one per output channel."""
    assert cfg.moe is not None
    if not cfg.moe.expert_linear_bias:
        return _expert_matrix_params(cfg)
    hidden = cfg.moe.resolved_expert_hidden(cfg.ffn_hidden)
    return _expert_matrix_params(cfg) + (_mlp_matrices(cfg) - 1) * hidden + cfg.d_model


def _ffn_params(cfg: ModelConfig, layer: int, *, active: bool = False, matrices: bool = False) -> int:
    """Feed-forward of block `layer`: the dense MLP, or router + experts + shared experts of an MoE layer.
    active: only the top_k experts a token uses (the router and shared experts are used by every token);
    matrices: weight matrices only (the matmuls), no biases."""
    moe = cfg.moe
    if moe is None or not cfg.is_moe_layer(layer):
        return _mlp_matrix_params(cfg) if matrices else _mlp_params(cfg)
    experts = moe.top_k if active else moe.n_experts
    router = cfg.d_model * (moe.n_experts + int(moe.shared_expert_gate))  # the shared gate is one more row
    router += 0 if matrices else moe.n_experts * int(moe.router_bias)
    shared = _mlp_matrices(cfg) * cfg.d_model * moe.resolved_shared_hidden(cfg.ffn_hidden)
    expert = _expert_matrix_params(cfg) if matrices else _expert_params(cfg)
    return router + experts * expert + shared


def _has_ffn(cfg: ModelConfig) -> bool:
    return cfg.layers is None or cfg.layers.feed_forward


def mtp_layers(cfg: ModelConfig) -> list[int]:
    """Block indices of the multi-token prediction depths (n_layers .. n_layers + D - 1; none without)."""
    depth = cfg.mtp.depth if cfg.mtp is not None else 0
    return list(range(cfg.n_layers, cfg.n_layers + depth))


def _mtp_extra_params(cfg: ModelConfig) -> int:
    """One depth besides its block: enorm, hnorm, its final norm and eh_proj (2d -> d, no bias)."""
    return 3 * _norm_params(cfg, cfg.d_model) + 2 * cfg.d_model * cfg.d_model


def _block_params(cfg: ModelConfig, *, cross_attention: bool = False, layer: int = 0) -> int:
    """attention_norm + the block's mixer (model.layers.pattern) + ffn_norm + feed_forward (+ cross_attention_norm
    + cross_attention), and the sandwich norms after both branches (Gemma 2); mixer-only blocks (layers
    feed_forward false) have neither ffn_norm nor feed_forward."""
    branches = 2 if _has_ffn(cfg) else 1
    norms = branches * (2 if cfg.sandwich_norm else 1)
    mixer = attention_params(cfg) if cross_attention else mixers.mixer_of(cfg, layer).params(cfg)
    ffn = _ffn_params(cfg, layer) if _has_ffn(cfg) else 0
    total = norms * _norm_params(cfg, cfg.d_model) + mixer + ffn
    if cross_attention:
        total += _norm_params(cfg, cfg.d_model) + attention_params(cfg, cross=True)
    return total


def block_params(cfg: ModelConfig, *, expert_shards: int = 1) -> list[int]:
    """Parameters of each block (the units FSDP2 gathers one at a time): the encoder's or decoder-only model's
    blocks, then a T5 decoder's. expert_shards: the ranks an MoE layer's routed experts are split over (expert
    parallelism), whose parameters count 1 / expert_shards each."""
    routed = cfg.moe.n_experts * _expert_params(cfg) if cfg.moe is not None else 0
    kept = routed - routed // expert_shards

    def block(layer: int, cross: bool) -> int:
        total = _block_params(cfg, cross_attention=cross, layer=layer)
        return total - kept if cfg.is_moe_layer(layer) else total

    out = [block(i, False) for i in range(cfg.n_layers)]
    if cfg.family == "encoder_decoder":
        out += [block(i, True) for i in range(cfg.decoder_layers)]
    # MTP depths: their blocks, each with its norms and eh_proj (an FSDP unit around the block's)
    return out + [block(i, False) + _mtp_extra_params(cfg) for i in mtp_layers(cfg)]


def _stack_params(cfg: ModelConfig, n_layers: int, *, cross_attention: bool = False) -> int:
    """One stack: its T5 relative-bias table (one Embedding(buckets, heads) per stack, shared by its layers),
    the blocks and the final norm of pre-norm stacks."""
    total = cfg.relative_buckets * cfg.n_heads if cfg.position == "relative_bias" else 0
    total += sum(_block_params(cfg, cross_attention=cross_attention, layer=i) for i in range(n_layers))
    return total + (_norm_params(cfg, cfg.d_model) if cfg.has_final_norm else 0)


def _head_params(cfg: ModelConfig) -> int:
    """BERT head transform (dense with bias, norm), output projection (absent when tied), output bias."""
    d = cfg.d_model
    total = d * d + d + _norm_params(cfg, d) if cfg.mlm_head_transform else 0
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * d
    return total + (cfg.vocab_size if cfg.output_bias else 0)


def _embedding_params(cfg: ModelConfig) -> int:
    """Input lookup tables, shared by encoder and decoder: tokens, learned positions, token types
    (Kaplan et al. 2020 leave these out of N)."""
    d = cfg.d_model
    total = cfg.vocab_size * d + cfg.type_vocab_size * d
    return total + (cfg.max_seq_len * d if cfg.position == "learned" else 0)


def _body_params(cfg: ModelConfig) -> int:
    """Non-embedding parameters before the head: embed_norm and the stacks (encoder + decoder for T5)."""
    total = _norm_params(cfg, cfg.d_model) if cfg.embedding_norm else 0
    total += _stack_params(cfg, cfg.n_layers)
    total += mtp_params(cfg)
    if cfg.family == "encoder_decoder":
        total += _stack_params(cfg, cfg.decoder_layers, cross_attention=True)
    return total


def mtp_params(cfg: ModelConfig) -> int:
    """Parameters of the multi-token prediction depths (their blocks, norms and eh_proj; 0 without model.mtp)."""
    return sum(_block_params(cfg, layer=i) + _mtp_extra_params(cfg) for i in mtp_layers(cfg))


def _inactive_expert_params(cfg: ModelConfig) -> int:
    """Parameters a token does not touch: (n_experts - top_k) routed experts in every MoE layer."""
    if cfg.moe is None:
        return 0
    layers = len(cfg.moe_layers) + sum(cfg.is_moe_layer(i) for i in mtp_layers(cfg))
    return layers * (cfg.moe.n_experts - cfg.moe.top_k) * _expert_params(cfg)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of `build_model(cfg)`, equal to sum(p.numel()) (tied embeddings counted once).

    embedding: the input lookup tables (token, learned position, token type); non_embedding: the rest, output
    projection included (Kaplan et al. 2020 count N without embeddings); active: parameters used per token.
    """
    embedding = _embedding_params(cfg)
    non_embedding = _body_params(cfg) + _head_params(cfg)
    total = embedding + non_embedding
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "active": total - _inactive_expert_params(cfg),
    }


# ----------------------------------------------------------------------------------------------------- FLOPs
def mean_keys_attended(seq_len: int, *, causal: bool, window: int | None = None) -> float:
    """Mean number of keys a query sees: seq_len (bidirectional), (seq_len + 1) / 2 (causal), and with a causal
    sliding window W the exact mean of min(i + 1, W) over positions i = 0 .. seq_len - 1."""
    if not causal:
        return float(seq_len)
    w = seq_len if window is None else min(window, seq_len)
    # positions 0..w-1 see i + 1 keys (sum w(w+1)/2); the remaining seq_len - w positions see w keys each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def attention_flops_per_query(cfg: ModelConfig, keys: float) -> float:
    """Forward FLOPs of q.k and p.v for one query and one layer: 2 x 2 x n_heads x head_dim x keys (PaLM B)."""
    return 4.0 * cfg.n_heads * cfg.resolved_head_dim * keys


def _layer_matmul_params(cfg: ModelConfig) -> int:
    return _attention_matrix_params(cfg) + _mlp_matrix_params(cfg)


def _stack_matmul_params(cfg: ModelConfig, *, active: bool, layers: list[int] | None = None) -> int:
    """Weight-matrix parameters of the n_layers blocks (or of the blocks `layers`); MoE layers count the router,
    the shared experts and all experts (active=False) or the top_k experts one token passes through (active=True:
    FLOPs per token)."""
    indices = range(cfg.n_layers) if layers is None else layers
    mixing = sum(mixers.mixer_of(cfg, i).matmul_params(cfg) for i in indices)
    if not _has_ffn(cfg):
        return mixing
    if cfg.moe is None:
        return mixing + len(indices) * _mlp_matrix_params(cfg)
    return mixing + sum(_ffn_params(cfg, i, active=active, matrices=True) for i in indices)


def _mtp_matmul_params(cfg: ModelConfig, *, active: bool) -> int:
    """The MTP depths per token: each block, eh_proj (2d x d) and the shared head once more."""
    depths = mtp_layers(cfg)
    blocks = _stack_matmul_params(cfg, active=active, layers=depths) if depths else 0
    return blocks + len(depths) * (2 * cfg.d_model * cfg.d_model + _head_matmul_params(cfg))


def _head_matmul_params(cfg: ModelConfig) -> int:
    """BERT transform dense and the output projection (done even when tied)."""
    d = cfg.d_model
    return (d * d if cfg.mlm_head_transform else 0) + cfg.vocab_size * d


def matmul_params(cfg: ModelConfig) -> int:
    """Weight-matrix parameters one forward multiplies with, each matrix once: every projection of every stack
    (cross-attention included), the BERT transform dense and the output head (tied or not)."""
    total = _stack_matmul_params(cfg, active=False) + _head_matmul_params(cfg)
    total += _mtp_matmul_params(cfg, active=False)
    if cfg.family == "encoder_decoder":
        total += cfg.decoder_layers * (_layer_matmul_params(cfg) + _attention_matrix_params(cfg))
    return total


def _cross_attention_matmul_flops(cfg: ModelConfig, enc_len: int, dec_len: int) -> float:
    """Per decoder layer: wq and wo over the decoder tokens, wk and wv over the encoder tokens."""
    d, hd = cfg.d_model, cfg.resolved_head_dim
    q_o = 2 * d * cfg.n_heads * hd
    k_v = 2 * d * cfg.resolved_kv_heads * hd
    return 2.0 * cfg.decoder_layers * (dec_len * q_o + enc_len * k_v)


def _single_stack_flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """decoder (causal, optional sliding window, whose full_attention_layers see every earlier key; each block's
    mixer from model.layers.pattern) or encoder (bidirectional): one stack and the head. `attention` holds the
    token-mixing term of every mixer (attention's q.k and p.v, the linear mixers' chunked state products)."""
    mixing = sum(
        mixers.mixer_of(cfg, i).mixing_flops(cfg, seq_len, mixers.layer_window(cfg, i))
        for i in [*range(cfg.n_layers), *mtp_layers(cfg)]
    )
    params = (
        _stack_matmul_params(cfg, active=True)
        + _head_matmul_params(cfg)
        + _mtp_matmul_params(cfg, active=True)
    )
    matmul = 2.0 * seq_len * params
    return {"matmul": matmul, "attention": seq_len * mixing}


def mixing_flops_by_mixer(cfg: ModelConfig, seq_len: int) -> dict[str, tuple[int, float]]:
    """Decoder stack: mixer name -> (blocks, forward token-mixing FLOPs per token summed over those blocks), the
    `attention` term of forward_flops_breakdown split by mixer (`loom check` lists it)."""
    out: dict[str, tuple[int, float]] = {}
    for i in range(cfg.n_layers):
        entry = mixers.mixer_of(cfg, i)
        blocks, total = out.get(entry.name, (0, 0.0))
        out[entry.name] = (blocks + 1, total + entry.mixing_flops(cfg, seq_len, mixers.layer_window(cfg, i)))
    return out


def _encoder_decoder_flops(cfg: ModelConfig, enc_len: int, dec_len: int) -> dict[str, float]:
    """Bidirectional encoder over enc_len tokens; causal decoder over dec_len tokens with cross-attention to
    every encoder position; the head over the decoder tokens."""
    tokens_through_blocks = cfg.n_layers * enc_len + cfg.decoder_layers * dec_len
    matmul = 2.0 * tokens_through_blocks * _layer_matmul_params(cfg)
    matmul += _cross_attention_matmul_flops(cfg, enc_len, dec_len) + 2.0 * dec_len * _head_matmul_params(cfg)
    dec_keys = mean_keys_attended(dec_len, causal=True, window=cfg.sliding_window)
    query_keys = cfg.n_layers * enc_len * enc_len + cfg.decoder_layers * dec_len * (dec_keys + enc_len)
    return {"matmul": matmul, "attention": attention_flops_per_query(cfg, query_keys)}


def forward_flops_breakdown(
    cfg: ModelConfig, seq_len: int, *, decoder_len: int | None = None
) -> dict[str, float]:
    """Forward FLOPs of one sequence, split into `matmul` (2 x weight params per token, head included) and
    `attention` (q.k and p.v). encoder_decoder: encoder length seq_len, decoder length decoder_len
    (default seq_len)."""
    if cfg.family != "encoder_decoder":
        return _single_stack_flops(cfg, seq_len)
    return _encoder_decoder_flops(cfg, seq_len, seq_len if decoder_len is None else decoder_len)


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int, *, decoder_len: int | None = None) -> float:
    """Forward FLOPs of one sequence (matmul + attention)."""
    return sum(forward_flops_breakdown(cfg, seq_len, decoder_len=decoder_len).values())


def tokens_per_sequence(cfg: ModelConfig, seq_len: int, *, decoder_len: int | None = None) -> int:
    """Tokens the per-token FLOPs are divided by: seq_len, or source + target tokens for encoder_decoder."""
    if cfg.family != "encoder_decoder":
        return seq_len
    return seq_len + (seq_len if decoder_len is None else decoder_len)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, training: bool = True, decoder_len: int | None = None
) -> float:
    """Model FLOPs per token (forward, or forward + backward = 3 x forward when training)."""
    forward = forward_flops_per_sequence(cfg, seq_len, decoder_len=decoder_len)
    per_token = forward / tokens_per_sequence(cfg, seq_len, decoder_len=decoder_len)
    return 3.0 * per_token if training else per_token


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device peak (PaLM appendix B; Megatron-LM).

    tokens_per_s and peak_flops must describe the same devices (per device, or summed over all of them), and
    tokens must be counted as flops_per_token counts them (source + target tokens for encoder_decoder).
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
