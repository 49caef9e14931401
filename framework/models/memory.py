"""Per-rank training memory of a recipe, in bytes, as pure functions of the config.

    parameters       fp32 master weights (bf16/fp16 autocast keeps parameters fp32 and casts per op)
    gradients        fp32, one per parameter
    optimizer_state  AdamW: exp_avg and exp_avg_sq, fp32 (Kingma & Ba 2015; Loshchilov & Hutter 2019); with
                     optim.name muon the weight matrices keep one fp32 momentum instead (Jordan et al. 2024)
    activations      tensors autograd saves for backward during one micro-batch
                     (train.micro_batch_size x data.seq_len), including the weight copies computed with
                     (autocast's low-precision copies, or the units FSDP2 has gathered)
    total            the sum (temporaries, the allocator's caches and communication buffers are not included)

The activation term is derived op by op from framework/models (which tensors each op's backward keeps, deduplicated
by storage as autograd keeps them alive), and tests/framework/models/test_memory.py checks it against
`torch.autograd.graph.saved_tensors_hooks` on CPU. The general shape follows Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", section 4), but every term below is *our* op sequence:

* RMSNorm (framework/models/norms.py) keeps its fp32 input, the per-row rsqrt and the normalised tensor (before the
  gain); nn.LayerNorm keeps its input, mean and rstd. The norm's output is kept by the linears that read it:
  once in fp32, but under autocast every nn.Linear casts its input separately (wq, wk and wv each keep a copy).
* Autocast also keeps one low-precision copy of every weight matrix (cached per forward, freed by backward).
  Under FSDP2 over more than one rank there is no such copy (its MixedPrecisionPolicy gathers the weights in the
  compute dtype and frees each block's after use; tests/framework/parallel/test_memory_fsdp.py): instead the
  root's weights (embeddings, final norms, head) stay gathered, and up to two blocks' at a time.
* SDPA's fused kernels (CPU flash, CUDA flash / memory-efficient) keep q, k, v, the output (which wo reads as a
  view) and a float32 logsumexp per query and head; with a mask or bias they also keep it, as [B, 1 or H, S, S].
  On CUDA no mask or bias is kept (keeps_score_tensor): masked cases run FlexAttention with block masks, which
  keeps no S x S tensor; only attention dropout (no dropout in Flex) still passes SDPA a dense mask.
  On CPU, attention dropout or a bias that needs a gradient (T5 relative bias, soft distance bias) falls back to
  the math kernel, which runs in fp32 and keeps scaled q and k, v, the probabilities (and dropout noise and the
  dropped probabilities), and wo keeps a copy of the output. The naive backend keeps copies of q, k, v, the fp32
  softmax and its low-precision copy, the boolean mask, and wo's input copy. GQA keys and values are repeated to
  all heads wherever the kernel repeats them (math, naive), and kept at kv_heads by the fused kernels.
  Soft-capped scores (model.attention_softcap) take no SDPA kernel: compiled Flex on CUDA (fused, as above), the
  naive path on CPU or with attention dropout, which also keeps tanh's output.
* RoPE keeps only the shared cos / sin tables (its rotations multiply by constants); the learned temperature keeps
  q (q * exp(-log_t)); the soft distance bias keeps |i - j| per layer; T5 keeps the bucket ids per stack.
* MLPs: SwiGLU / GeGLU keep the gate input, the activation output, the up projection and their product (w2's
  input); GELU keeps its input and output; ReLU only its output (which is also w2's input).
* Dropout (p > 0): on CPU the noise tensor in the input's dtype, on CUDA a bool mask (native_dropout).
* Recurrent mixers (Gated DeltaNet, Mamba-2; the registry's `activation_bytes`, framework/models/mixers.py): the
  depthwise conv's input and padded output, the gates, and the PyTorch chunked forms' chunk terms: per chunk and
  head a few C x C matrices, per chunk boundary one state (GDN dk x dv, Mamba-2 head_dim x state_dim), and the
  matmul operands they keep (cast copies under autocast). Linear in the sequence length but for Mamba-2's
  (chunks + 1)^2 decay matrix. Blocks without a feed-forward (model.layers.feed_forward false) keep one norm.
* Embeddings keep their index tensors; cross-entropy keeps the fp32 log-softmax [tokens, vocab] and the labels;
  the z-loss also keeps the fp32 logits, final-logit soft-capping tanh's output. Sandwich norms (Gemma 2) add
  two norms per block over the branch outputs; Gemma's (1 + w) RMSNorm keeps its normed tensor in fp32.

Parallel layouts are taken into account where the division is obvious; the engine issue will verify these:
FSDP / HSDP shard parameters, gradients and optimizer state over dp_shard (gradients: FSDP2 reduce-scatters after
every micro-batch, so no rank holds unsharded gradients during accumulation); tensor parallelism splits layer weights
and per-layer activations over tp (norm and dropout activations only with sequence_parallel, Korthikanti et al.
2022); context parallelism splits tokens over cp; pipeline stages hold n_layers / pp layers, and 1F1B-style
schedules keep up to pp micro-batches in flight on the first stage (GPipe keeps all of them), so its activation
memory is that of about n_layers layers (Narayanan et al. 2021). Activation checkpointing keeps only the block
inputs of checkpointed blocks, plus one block recomputed at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from framework.config.errors import ConfigError
from framework.config.schema import GDNConfig, Mamba2Config, ModelConfig, ParallelConfig, Recipe
from framework.data.objectives import span_corruption_lengths
from framework.gpus import gpu_named
from framework.models.flops import GATED_MLPS, block_params, matmul_params, param_counts
from framework.models.mixers import MIXERS, Mixer, layer_window, local_config, mixer_of

FP32 = 4
INDEX = 8  # int64 token / position / bucket ids
ADAMW_STATES = 2
MATRIX_STATES = {"adamw": ADAMW_STATES, "muon": 1}
"""fp32 state tensors per weight-matrix parameter, by optim.name: AdamW's two moments, Muon's momentum."""


def optimizer_state_elements(recipe: Recipe) -> int:
    """fp32 optimizer-state elements of the whole model. Muon's matrices (framework/train/optim.py's rule: every
    matmul weight but the output head) keep MATRIX_STATES[optim.name]; everything else AdamW's two."""
    cfg = recipe.model
    total = param_counts(cfg)["total"]
    matrices = matmul_params(cfg) - cfg.vocab_size * cfg.d_model if recipe.optim.name == "muon" else 0
    return ADAMW_STATES * (total - matrices) + MATRIX_STATES[recipe.optim.name] * matrices


# ------------------------------------------------------------------------------------------------ layout
def _world_size(recipe: Recipe) -> int:
    return recipe.launch.nproc_per_node * recipe.launch.nnodes


def shard_degree(recipe: Recipe) -> int:
    """Ranks that share one copy of the weights: dp_shard for FSDP / HSDP (-1 = what the world size leaves after
    the other dimensions), times cp with the native engine (FSDP2 shards over the flattened (dp_shard, cp) mesh:
    framework/parallel/context.py data_parallel_mesh), 1 for DDP."""
    p = recipe.parallel
    if p.data_parallel == "ddp":
        return 1
    dp_shard = (
        p.dp_shard
        if p.dp_shard != -1
        else max(1, _world_size(recipe) // (p.dp_replicate * p.tp * p.pp * p.cp))
    )
    return dp_shard * (p.cp if p.engine == "native" else 1)


def _weight_fraction(recipe: Recipe, *, sharded: bool = True) -> float:
    """Share of the weights one rank holds: 1 / (fsdp shards x tp x pp) (norms replicated under tp: ignored).
    sharded=False leaves out the FSDP shards: what a rank computes with is the all-gathered layer."""
    p = recipe.parallel
    return 1.0 / ((shard_degree(recipe) if sharded else 1) * p.tp * p.pp)


# ------------------------------------------------------------------------------------ precision / device
@dataclass(frozen=True)
class _Sizes:
    """Bytes per element of what backward keeps, for one precision and device."""

    compute: int
    """Matmul outputs and their inputs' casts: 2 under bf16 / fp16 autocast, else 4."""
    cpu: bool
    """CPU: dropout keeps noise in the input dtype (CUDA: a bool mask); SDPA falls back to the math kernel for
    attention dropout and biases with gradients; autocast runs LayerNorm in the input dtype."""

    @property
    def autocast(self) -> bool:
        return self.compute < FP32

    def dropout_bytes(self, input_bytes: int) -> int:
        return input_bytes if self.cpu else 1


def _sizes(recipe: Recipe, device: str | None) -> _Sizes:
    """device None = recipe.train.device, where "auto" plans for CUDA (and precision.dtype auto for bf16)."""
    device = device or recipe.train.device
    dtype = recipe.precision.resolved_dtype("cpu" if device == "cpu" else "cuda")
    compute = FP32 if dtype == "fp32" else 2
    return _Sizes(compute=compute, cpu=device == "cpu")


# ------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class _Shape:
    """One stack's forward: batch, query length, whether it is causal, and the batch's masks."""

    batch: int
    seq: int
    causal: bool
    documents: bool = False
    prefix: bool = False
    ring: bool = False
    """Self-attention runs as ring attention (parallel.cp_ring > 1): `_ring_bytes`."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def sequence_lengths(recipe: Recipe) -> tuple[int, int | None]:
    """(encoder or decoder-only length, decoder length or None): span corruption shortens both (T5 sentinels)."""
    d, m = recipe.data, recipe.model
    if m.family != "encoder_decoder":
        return d.seq_len, None
    return span_corruption_lengths(d.seq_len, d.noise_density, d.mean_span_length)


# ---------------------------------------------------------------------------------------------- norms
def _norm_bytes(cfg: ModelConfig, s: _Sizes, rows: int, dim: int, input_bytes: int) -> int:
    """RMSNorm: fp32 input (a copy when the input is low precision), rsqrt per row, normed in the input dtype
    (`normed.type_as(x)` is what the gain multiplies). LayerNorm: input, mean, rstd; CUDA autocast runs it in
    fp32 (an fp32 copy of a low-precision input), CPU autocast in the input dtype."""
    if cfg.norm == "rmsnorm":
        # Gemma's (1 + w) gain multiplies the fp32 normed tensor and casts afterwards (norms.OffsetRMSNorm)
        normed = FP32 if cfg.norm_weight_offset else input_bytes
        return rows * dim * (FP32 + normed) + rows * FP32
    saved_input = input_bytes if s.cpu else FP32
    return rows * dim * saved_input + 2 * rows * FP32


def _linear_input_bytes(s: _Sizes, tokens: int, dim: int, readers: int) -> int:
    """A fp32 tensor read by `readers` linears: kept once in fp32, or once per linear as its autocast copy."""
    return tokens * dim * (readers * s.compute if s.autocast else FP32)


# ------------------------------------------------------------------------------------------ attention
def _sdpa_path(cfg: ModelConfig, s: _Sizes, *, has_bias: bool) -> str:
    """fused, math (CPU fallback) or naive, as framework/models/attention.py and torch pick them."""
    if cfg.attention_backend == "naive":
        return "naive"
    if cfg.attention_backend == "flex":
        return "fused"  # q, k, v, out, logsumexp; block masks and score mods keep no dense tensor
    if cfg.attention_softcap is not None:  # no SDPA kernel caps scores: compiled Flex on CUDA, else naive
        return "naive" if s.cpu or cfg.attention_dropout > 0 else "fused"
    bias_has_grad = has_bias and (
        cfg.position == "relative_bias" or cfg.soft_distance_bias or cfg.learned_temperature
    )
    if s.cpu and (cfg.attention_dropout > 0 or bias_has_grad):
        return "math"
    return "fused"


def _has_bias(cfg: ModelConfig, cross: bool) -> bool:
    """Self-attention has an additive bias with ALiBi, T5 relative bias or the soft distance bias."""
    return not cross and (cfg.position in ("alibi", "relative_bias") or cfg.soft_distance_bias)


def _dense_mask(shape: _Shape, cross: bool) -> bool:
    """The attention context builds a dense mask unless attention is full (cross-attention, plain encoders)."""
    return not cross and (shape.causal or shape.documents)


def _plain_causal(cfg: ModelConfig, shape: _Shape) -> bool:
    """SDPA gets is_causal=True instead of a mask (when there is no bias either)."""
    return shape.causal and cfg.sliding_window is None and not shape.prefix and not shape.documents


def _attention_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape, k_len: int, *, cross: bool = False) -> int:
    """One attention module's kept tensors after the projections (their inputs are counted by the block)."""
    b, sq, h, hd = shape.batch, shape.seq, cfg.n_heads, cfg.resolved_head_dim
    q_elems, kv_elems = b * sq * h * hd, b * k_len * cfg.resolved_kv_heads * hd
    if shape.ring and not cross:
        return _qk_norm_bytes(cfg, s, b * sq, b * k_len) + _ring_bytes(q_elems, kv_elems, b * h * sq, s)
    has_bias, dense = _has_bias(cfg, cross), _dense_mask(shape, cross)
    path = _sdpa_path(cfg, s, has_bias=has_bias)
    total = _qk_norm_bytes(cfg, s, b * sq, b * k_len) + _bias_bytes(cfg, s, shape, k_len, cross, path)
    if path == "fused":
        total += (2 * q_elems + 2 * kv_elems) * s.compute + b * h * sq * FP32  # q, k, v, out, logsumexp
        if cfg.attention_sinks and not cross:
            total += _sinks_bytes(cfg, s, shape, k_len, dense)
        if not keeps_score_tensor(cfg, s.cpu):
            return total
        if has_bias:
            total += b * h * sq * k_len * s.compute  # the bias (masked), as attn_mask
        elif dense and not _plain_causal(cfg, shape):
            total += b * sq * k_len * s.compute  # the bool mask converted to an additive one
        return total
    repeated = b * k_len * h * hd  # k and v repeated to every query head
    total += q_elems * s.compute  # wo's input: a copy of the output
    if path == "math":
        total += b * sq * k_len * int(dense and has_bias)  # bool ~mask of masked_fill on the bias
        return total + (q_elems + 2 * repeated) * FP32 + _probs_bytes(cfg, b * h * sq * k_len, FP32, FP32)
    total += b * sq * k_len * int(dense)  # bool ~mask of masked_fill on the scores
    total += (q_elems + 2 * repeated) * s.compute  # q, k, v copies for the einsums
    if cfg.attention_softcap is not None:
        total += b * h * sq * k_len * s.compute  # tanh's output (the soft-capped scores)
    return total + _probs_bytes(cfg, b * h * sq * k_len, s.compute, FP32)


def _ring_bytes(q_elems: int, kv_elems: int, rows: int, s: _Sizes) -> int:
    """Ring attention (framework/parallel/ring.py) keeps its q, k and v shards, the last K/V block it received
    (where backward starts), the merged output and its fp32 log-sum-exp, whatever the mask or score terms (blocks
    and their masks are rebuilt in backward); wo's input is a copy of the output ([B, H, s, D] transposed to
    [B, s, H x D])."""
    return (3 * q_elems + 4 * kv_elems) * s.compute + rows * FP32


def _sinks_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape, k_len: int, dense: bool) -> int:
    """What attention sinks add to a fused call. CPU (sdpa_attention_with_sinks): q, k, v one channel wider and
    k, v one key longer, SDPA's output one channel wider and, no longer a free view for wo, kept beside wo's
    input copy; the mask one key column longer (a plain causal call builds one: no is_causal). CUDA (compiled
    Flex, rescale_for_sinks): the plain output and the sigmoid weight the product keeps."""
    b, sq, h, hd, kv = shape.batch, shape.seq, cfg.n_heads, cfg.resolved_head_dim, cfg.resolved_kv_heads
    if not s.cpu:
        return b * sq * h * hd * s.compute + b * h * sq * (FP32 + s.compute)
    wider = b * h * sq + b * h * sq * (hd + 1) + 2 * b * kv * ((k_len + 1) * (hd + 1) - k_len * hd)
    mask = 0 if not dense else b * sq * (k_len + 1) if _plain_causal(cfg, shape) else b * sq
    return (wider + mask) * s.compute


def attention_activation_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape) -> int:
    """Self-attention's entry of the mixer registry: `_attention_bytes` over the block's own sequence, and the
    output gate (model.attention_gate: out * sigmoid(wg x)) keeps sigmoid's output and the product wo reads."""
    gate = 2 * shape.tokens * cfg.n_heads * cfg.resolved_head_dim * s.compute if cfg.attention_gate else 0
    return _attention_bytes(cfg, s, shape, shape.seq) + gate


def mla_activation_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape) -> int:
    """MLA's entry of the mixer registry: the attention core as `_attention_bytes` with q/k/v of nope + rope
    channels per head (v is v_head_dim wide, so this overcounts v by (qk - v) channels per head), plus the latent
    paths: wkv_a's output and kv_norm's output (wkv_b's input), kv_norm's rstd, the same for the query latent with
    q_lora_rank, and the fp32 copies apply_rope keeps of the rope channels (q per head, the one shared key)."""
    m = cfg.mla
    if m is None:
        raise ValueError("an mla block needs model.mla")
    core = dataclasses.replace(cfg, head_dim=m.qk_head_dim, kv_heads=None)
    tokens = shape.tokens
    latent = tokens * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * s.compute + tokens * FP32
    if m.q_lora_rank is not None:
        latent += tokens * 2 * m.q_lora_rank * s.compute + tokens * FP32
    rope = tokens * (cfg.n_heads + 1) * m.qk_rope_head_dim * FP32
    return _attention_bytes(core, s, shape, shape.seq) + latent + rope


def keeps_score_tensor(cfg: ModelConfig, cpu: bool) -> bool:
    """Whether a fused attention call keeps a dense [B, 1 or H, Sq, Sk] mask or bias for backward. Assumption
    for CUDA (issue 20 item 5, framework/models/attention.py): every masked or biased case (window, documents,
    prefix-LM, ALiBi, T5 bias) runs a fused kernel (flash for plain causal, compiled FlexAttention with a block
    mask and score_mod otherwise) that keeps only q, k, v, out and the logsumexp; SDPA with an explicit
    attn_mask remains only for attention dropout, which FlexAttention lacks. On CPU SDPA gets the dense mask."""
    return cpu or cfg.attention_dropout > 0


def _probs_bytes(cfg: ModelConfig, scores: int, compute: int, softmax: int) -> int:
    """softmax output (fp32 in the naive backend), plus dropout noise and the dropped probabilities, or the
    probabilities' cast back to the compute dtype."""
    total = scores * softmax
    if cfg.attention_dropout > 0:
        return total + 2 * scores * compute
    return total + (scores * compute if compute != softmax else 0)


def _bias_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape, k_len: int, cross: bool, path: str) -> int:
    """Soft-masking extras: the learned temperature keeps q (SDPA: q * exp(-log_t), and the bias it scales) or
    the scores (naive); the soft distance bias keeps |p_i - p_j| for its multiply with w_h."""
    b, sq, h = shape.batch, shape.seq, cfg.n_heads
    scores = b * h * sq * k_len
    total = b * sq * k_len * FP32 if cfg.soft_distance_bias and not cross else 0
    if not cfg.learned_temperature:
        return total
    if path == "naive":
        score_bytes = FP32 if _has_bias(cfg, cross) else s.compute  # an fp32 bias promotes the scores
        return total + scores * score_bytes
    total += b * sq * h * cfg.resolved_head_dim * s.compute
    return total + (scores * FP32 if _has_bias(cfg, cross) else 0)


def _qk_norm_bytes(cfg: ModelConfig, s: _Sizes, q_tokens: int, k_tokens: int) -> int:
    """q_norm and k_norm over head_dim, on the projections' outputs (compute dtype)."""
    if not cfg.qk_norm:
        return 0
    hd = cfg.resolved_head_dim
    if cfg.qk_norm_scope == "projection":  # one row per token, all heads' channels (OLMo 2)
        q_bytes = _norm_bytes(cfg, s, q_tokens, cfg.n_heads * hd, s.compute)
        return q_bytes + _norm_bytes(cfg, s, k_tokens, cfg.resolved_kv_heads * hd, s.compute)
    q_rows, k_rows = q_tokens * cfg.n_heads, k_tokens * cfg.resolved_kv_heads
    return _norm_bytes(cfg, s, q_rows, hd, s.compute) + _norm_bytes(cfg, s, k_rows, hd, s.compute)


# ----------------------------------------------------------------------------------------------- MLP
def _mlp_bytes(cfg: ModelConfig, s: _Sizes, tokens: int, hidden: int | None = None) -> int:
    """Hidden tensors kept by the activation, the gate product and w2 (the MLP input is counted by the block)."""
    kept = {"relu": 1, "gelu": 2}.get(cfg.mlp, 4)
    return kept * tokens * (hidden or cfg.ffn_hidden) * s.compute


def _moe_bytes(cfg: ModelConfig, s: _Sizes, tokens: int) -> int:
    """An MoE feed-forward (an estimate, not yet checked against saved tensors): the fp32 router input, logits
    and probabilities; per kept assignment (tokens x top_k, dropless) the gathered input (per expert linear),
    the expert's hidden tensors and its output (kept by the weighting); the shared experts' MLP."""
    moe = cfg.moe
    assert moe is not None
    hidden, assignments = moe.resolved_expert_hidden(cfg.ffn_hidden), tokens * moe.top_k
    router = tokens * cfg.d_model * FP32 + 2 * tokens * moe.n_experts * FP32
    routed = _linear_input_bytes(s, assignments, cfg.d_model, _mlp_readers(cfg))
    routed += _mlp_bytes(cfg, s, assignments, hidden) + assignments * cfg.d_model * s.compute
    width = moe.resolved_shared_hidden(cfg.ffn_hidden)
    shared = _mlp_bytes(cfg, s, tokens, width) if moe.n_shared_experts else 0
    if moe.shared_expert_gate:  # the gate logit, and the ungated shared output kept for the product
        shared += tokens * (1 + cfg.d_model) * s.compute
    return router + routed + shared


def _mlp_readers(cfg: ModelConfig) -> int:
    return 2 if cfg.mlp in GATED_MLPS else 1


# ------------------------------------------------------------------------------------------ recurrent mixers
# What the PyTorch chunked paths keep (framework/models/gdn.py chunked_gated_delta_rule, mamba2.py chunked_ssd),
# one device, no state carried in. Their recurrence runs in fp32 even under autocast, but every matmul there (@,
# bmm, einsum) casts its operands under autocast: a tensor read only by matmuls is kept in the compute dtype, one
# also read by an elementwise op is kept in fp32 as well. A CUDA kernel installed as the module's `kernel`
# (framework/kernels/fla.py, mamba_ssm.py; no run installs one yet) keeps its own, smaller set: not modelled.
def _conv_bytes(s: _Sizes, shape: _Shape, channels: int, kernel: int, convs: int, weight_copies: bool) -> int:
    """`convs` causal depthwise convs + SiLU (framework/models/recurrence.py) over `channels` channels in all.
    Without documents one conv1d keeps its input, and SiLU the conv's output over all S + K - 1 padded positions
    (the [..., :S] slice is a view). With documents the shifted sum keeps, per tap, the masked tap and the mask
    cast to the dtype ([B, S] per conv), and SiLU the sum. `weight_copies`: the conv weight is not a parameter
    (GDN concatenates q, k, v's) or autocast casts it, so [channels, K] is kept in the compute dtype."""
    b, seq, c = shape.batch, shape.seq, s.compute
    weight = channels * kernel * c if weight_copies or s.autocast else 0
    if not shape.documents:
        return weight + b * seq * channels * c + b * (seq + kernel - 1) * channels * c
    return weight + kernel * b * seq * (channels + convs) * c + b * seq * channels * c


def _padded(seq: int, chunk: int) -> tuple[int, int]:
    """(chunks, padded length): the chunked forms zero-pad the sequence to whole chunks."""
    chunks = -(-seq // chunk)
    return chunks, chunks * chunk


def gdn_activation_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape) -> int:
    """Gated DeltaNet after its six input projections (their input is counted by the block): the conv over q, k,
    v, the gates, the l2-normalised q and k, the chunked WY form and the gated norm. Value heads H, chunk C,
    N chunks, P = N C padded tokens; rows = batch x H."""
    g = cfg.gdn or GDNConfig()
    b, seq, h = shape.batch, shape.seq, g.heads
    dk, dv = g.key_head_dim, g.value_head_dim
    channels = 2 * g.resolved_key_heads * dk + h * dv
    total = _conv_bytes(s, shape, channels, g.conv_kernel, 1, weight_copies=True)  # one conv over q, k, v
    # beta = sigmoid(wb x) (compute dtype); softplus's input and output (fp32); exp(A_log) and its negation
    total += b * seq * h * (s.compute + 2 * FP32) + 2 * h * FP32
    # l2norm of q and k (repeated to the value heads, fp32): the input and the rsqrt per row
    total += 2 * b * h * seq * (dk + 1) * FP32
    return total + _wy_bytes(g, s, b, seq) + _gdn_output_bytes(g, s, b, seq)


def _wy_bytes(g: GDNConfig, s: _Sizes, b: int, seq: int) -> int:
    """chunked_gated_delta_rule: the chunk terms (`_chunk_terms`), the two solves and Q K^T, per (batch, value
    head) row; then the loop over chunks. C = chunk_size, N chunks, P = N C padded tokens."""
    dk, dv, chunk, c = g.key_head_dim, g.value_head_dim, g.chunk_size, s.compute
    chunks, padded = _padded(seq, chunk)
    # The matmuls' operands Q, K, K^T (twice) are kept as copies: autocast's casts, or in fp32 without padding
    # the contiguous copies of the [B, S, H, dk]-strided chunks (F.pad pads nothing, so nothing is contiguous)
    copies = 4 * (s.autocast or seq % chunk == 0)
    keys = padded * dk * (3 * FP32 + copies * c)  # Q and K chunked, W (fp32), and those copies
    values = padded * dv * 2 * FP32  # beta V, U_v = (I + A)^-1 beta V
    # C x C per chunk: exp(G_t - G_j), D, beta D, I + A in fp32; K K^T, Q K^T, D o Q K^T in the compute dtype
    square = padded * chunk * (4 * FP32 + 3 * c)
    # one per token: beta, exp(G) twice, c exp(G), beta c, beta c exp(G), exp(G_last - G) and its masked value
    vectors = 8 * padded * FP32
    shared = b * padded * (FP32 + 1) + b * chunks * chunk * chunk + chunk * chunk * FP32  # c_t, masks, 1 - I
    return b * g.heads * (keys + values + square + vectors + _wy_loop_bytes(g, s, chunks)) + shared


def _wy_loop_bytes(g: GDNConfig, s: _Sizes, chunks: int) -> int:
    """The loop over chunks, per row: U_n = U_v - W S_n, O_n = (c e^G Q) S_n + (D o Q K^T) U_n and
    S_{n+1} = c_last e^G_last S_n + K_d^T U_n. The last chunk's state update feeds only the final state, which the
    single-device scan drops, so what it alone saved is freed; chunk 0's state (zeros) needs no gradient, so W_0
    and Q_0 are not kept for it. fp32 keeps whole tensors while any chunk's slice is kept; autocast keeps per
    chunk the casts of both operands of every product."""
    dk, dv, chunk, c = g.key_head_dim, g.value_head_dim, g.chunk_size, s.compute
    state = dk * dv
    if s.autocast:
        keys = 3 * (chunks - 1) * chunk * dk * c  # W_n, c e^G Q_n (n > 0), K_d^T (n < N - 1)
        values = (2 * chunks - 1) * chunk * dv * c  # U_n for (D o Q K^T) U_n, and for K_d^T U_n (n < N - 1)
        states = (chunks - 1) * state * FP32 + 2 * chunks * state * c  # S_n (fp32, kept by the decay product)
    else:
        keys = 2 * chunks * chunk * dk * FP32 if chunks > 1 else 0  # c e^G Q and K_d
        values, states = chunks * chunk * dv * FP32, chunks * state * FP32  # U_n; S_n
    vectors = FP32 * chunks * (int(chunks > 1) + int(chunks > 2))  # exp(G_last); c_last exp(G_last)
    return keys + values + states + vectors


def _gdn_output_bytes(g: GDNConfig, s: _Sizes, b: int, seq: int) -> int:
    """The scan's output o (padded fp32 cat, or its fp32 copy of the bf16 one under autocast) and the gated norm
    weight * (o / rms(o)) * silu(z): normed (input dtype), weight x normed, silu(z), z in fp32, rsqrt; wo's input."""
    h, dv, c = g.heads, g.value_head_dim, s.compute
    _, padded = _padded(seq, g.chunk_size)
    o = b * h * (seq if s.autocast else padded) * dv * FP32
    return o + b * seq * h * (dv * (2 * c + 3 * FP32) + FP32)


def mamba2_activation_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape) -> int:
    """Mamba-2 after its five input projections (their input is counted by the block): the convs over x, B, C,
    dt, the chunked SSD and the gated norm. Heads H, head_dim P, state N, chunk L, n chunks, T = n L padded."""
    m = cfg.mamba2 or Mamba2Config()
    b, seq, inner, c = shape.batch, shape.seq, m.inner, s.compute
    channels = inner + 2 * m.groups * m.state_dim
    total = _conv_bytes(s, shape, channels, m.conv_kernel, 3, weight_copies=False)  # x, B, C
    total += b * seq * m.heads * FP32 + 2 * m.heads * FP32  # softplus input; A = -exp(A_log) and exp's result
    total += _ssd_bytes(m, s, b, seq)
    # the gated norm: y + D x, z, silu(z), their product and the normed tensor in fp32, rsqrt per group
    gated_norm = 5 * inner * FP32 + m.groups * FP32
    skip_and_out = inner * (FP32 + c)  # the D skip's fp32 x; out_proj's input
    return total + b * seq * (gated_norm + skip_and_out)


def _ssd_bytes(m: Mamba2Config, s: _Sizes, b: int, seq: int) -> int:
    """chunked_ssd: dt x, the group-expanded B and C, the intra-chunk quadratic form, the chunk states and their
    pass over chunks (einsum operands are kept as permuted copies, cast under autocast)."""
    h, p, n, chunk, c = m.heads, m.head_dim, m.state_dim, m.chunk_size, s.compute
    chunks, padded = _padded(seq, chunk)
    per_token = h * (p * (FP32 + 3 * c) + FP32)  # x (fp32) for x dt; dt x for two einsums; y_off; dt
    per_token += h * n * (FP32 + 4 * c)  # B (fp32) and its product for the chunk ends, B and C (twice) copies
    per_token += h * 4 * FP32 + 2  # to_end, from_start: exp and masked (fp32); two bool masks [B, 1, T]
    square = b * h * chunks * chunk * chunk * (2 * FP32 + 2 * c) + b * chunks * chunk * chunk + chunk * chunk
    # the pass chunk by chunk: each chunk's total decay (exp and its masked product, fp32) and its reset mask;
    # the state entering each chunk after the first (fp32, kept by decay x state; measured: the first chunk's
    # zero state is not kept), and the states as the C . H einsum's copy (compute dtype; one chunk: a view of a
    # [2, ...] result)
    passed = 2 * b * h * chunks * FP32 + b * chunks
    states = b * (chunks - 1) * h * p * n * FP32 + b * max(chunks, 2) * h * p * n * c
    # fp32 without padding: x dt multiplies the conv output itself, which the D skip keeps as well
    shared_x = b * seq * m.inner * FP32 if padded == seq and not s.autocast else 0
    return b * padded * per_token + square + passed + states - shared_x


# --------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class _Layer:
    """What makes blocks of a stack differ: the mixer, the window it attends with, a MoE feed-forward."""

    name: str
    window: int | None
    moe: bool

    @property
    def mixer(self) -> Mixer:
        return MIXERS[self.name]

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """cfg as the block's mixer is built from it (attention_local's), with the block's own window."""
        base = local_config(cfg) if self.mixer.context == "local" else cfg
        if self.window == base.sliding_window and not base.full_attention_layers:
            return base
        return dataclasses.replace(base, sliding_window=self.window, full_attention_layers=None)


def _layer(cfg: ModelConfig, index: int) -> _Layer:
    return _Layer(mixer_of(cfg, index).name, layer_window(cfg, index), cfg.is_moe_layer(index))


def _has_ffn(cfg: ModelConfig) -> bool:
    return cfg.layers is None or cfg.layers.feed_forward


def _block_bytes(
    cfg: ModelConfig, s: _Sizes, shape: _Shape, layer: _Layer, memory_len: int | None
) -> dict[str, int]:
    """One block, split into what tensor parallelism always divides (`split`) and the norm / dropout /
    linear-input part it divides only with sequence parallelism (`sequence`). Mixer-only blocks
    (model.layers.feed_forward false) have no ffn_norm and no feed-forward."""
    d, tokens, ffn = cfg.d_model, shape.tokens, _has_ffn(cfg)
    branches = 1 + int(ffn) + int(memory_len is not None)
    mixer_cfg = layer.config(cfg)
    split = layer.mixer.activation_bytes(mixer_cfg, s, shape)
    sequence = branches * _norm_bytes(cfg, s, tokens, d, FP32)
    sequence += _linear_input_bytes(s, tokens, d, layer.mixer.input_readers(mixer_cfg))
    if ffn:
        split += _moe_bytes(cfg, s, tokens) if layer.moe else _mlp_bytes(cfg, s, tokens)
        sequence += _linear_input_bytes(s, tokens, d, _mlp_readers(cfg))
    if cfg.sandwich_norm:  # the norms of the mixer and MLP outputs, which are in the compute dtype
        sequence += (1 + int(ffn)) * _norm_bytes(cfg, s, tokens, d, s.compute)
    if cfg.dropout > 0:
        sequence += branches * tokens * d * s.dropout_bytes(s.compute)
    if memory_len is not None:
        split += _attention_bytes(cfg, s, shape, memory_len, cross=True)
        sequence += _linear_input_bytes(s, tokens, d, 1)  # cross-attention wq
        if s.autocast:  # wk and wv each cast the encoder output (its fp32 copy is counted once per stack)
            split += 2 * shape.batch * memory_len * d * s.compute
    return {"split": split, "sequence": sequence}


def _mean_block_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape, memory_len: int | None) -> dict[str, float]:
    """_block_bytes averaged over the stack's blocks (the decoder stack's with memory_len), which differ in mixer,
    window (full_attention_layers run plain causal, without a dense mask) and dense or MoE feed-forward."""
    n_layers = cfg.n_layers if memory_len is None else cfg.decoder_layers
    kinds = Counter(_layer(cfg, i) for i in range(n_layers))
    mean = {"split": 0.0, "sequence": 0.0}
    for layer, count in kinds.items():
        block = _block_bytes(cfg, s, shape, layer, memory_len)
        for key in mean:
            mean[key] += block[key] * count / n_layers
    return mean


def _rope_contexts(cfg: ModelConfig, memory_len: int | None) -> int:
    """RoPE tables a stack keeps: one per attention context (global, local) its attention blocks read; recurrent
    mixers read no positions, so a stack of them keeps none."""
    n_layers = cfg.n_layers if memory_len is None else cfg.decoder_layers
    return len({m.context for m in (mixer_of(cfg, i) for i in range(n_layers)) if not m.recurrent})


def _checkpointed_layers(recipe: Recipe, n_layers: int) -> int:
    """Blocks whose activations are recomputed: all (full), every other one (selective), none."""
    mode = recipe.parallel.activation_checkpointing
    return {"full": n_layers, "selective": n_layers // 2}.get(mode, 0)


def _stack_bytes(recipe: Recipe, s: _Sizes, shape: _Shape, n_layers: int, memory_len: int | None) -> int:
    """The blocks of one stack on one rank, plus the tables every block shares (RoPE cos/sin, T5 buckets)."""
    cfg, p = recipe.model, recipe.parallel
    block = _mean_block_bytes(cfg, s, shape, memory_len)
    per_block = block["split"] / p.tp + block["sequence"] / (p.tp if p.sequence_parallel else 1)
    stored = n_layers - _checkpointed_layers(recipe, n_layers)
    boundary = shape.tokens * cfg.d_model * FP32  # a checkpointed block keeps its input only
    layers = stored * per_block + (n_layers - stored) * boundary + (per_block if stored < n_layers else 0)
    shared = 0
    if cfg.position == "rope":  # cos and sin, [B, S, head_dim / 2] each, per attention context
        shared += _rope_contexts(cfg, memory_len) * shape.tokens * cfg.resolved_head_dim * FP32
    if cfg.position == "relative_bias":
        shared += shape.batch * shape.seq * shape.seq * INDEX  # bucket ids
    if memory_len is not None and not s.autocast:
        shared += shape.batch * memory_len * cfg.d_model * FP32  # encoder output, read by every wk / wv
    return int(layers + shared)


# ------------------------------------------------------------------------------ embeddings, head, loss
def _embedding_bytes(cfg: ModelConfig, s: _Sizes, shape: _Shape, *, token_types: bool) -> int:
    """Index tensors of the lookups, embed_norm and the embedding dropout of one embedded sequence."""
    tokens, d = shape.tokens, cfg.d_model
    total = tokens * INDEX
    if cfg.position == "learned":
        total += shape.seq * INDEX  # positions 0..S-1 broadcast over the batch
    if token_types and cfg.type_vocab_size > 0:
        total += tokens * INDEX
    if cfg.embedding_norm:
        total += _norm_bytes(cfg, s, tokens, d, FP32)
    if cfg.dropout > 0:
        total += tokens * d * s.dropout_bytes(FP32)
    return total


def _head_bytes(recipe: Recipe, s: _Sizes, tokens: int) -> int:
    """Final norm, BERT head transform, output projection input, cross-entropy (and z-loss)."""
    cfg = recipe.model
    d, vocab = cfg.d_model, cfg.vocab_size
    total = _norm_bytes(cfg, s, tokens, d, FP32) if cfg.has_final_norm else 0
    total += _linear_input_bytes(s, tokens, d, 1)
    if cfg.mlm_head_transform:
        activation = tokens * d * s.compute  # the activation's input (ReLU: its output)
        total += activation + _norm_bytes(cfg, s, tokens, d, s.compute) + _linear_input_bytes(s, tokens, d, 1)
    total += tokens * vocab * FP32 + tokens * INDEX  # log-softmax, labels
    if cfg.final_logit_softcap is not None:
        total += tokens * vocab * s.compute  # tanh's output (the capped logits)
    if recipe.train.z_loss > 0:
        total += tokens * vocab * FP32  # fp32 logits kept by logsumexp and gather
    return total


# ---------------------------------------------------------------------------------------- activations
def _pipeline_in_flight(recipe: Recipe) -> int:
    """Micro-batches whose activations the first stage holds at once: pp (1F1B family) or all (GPipe)."""
    p = recipe.parallel
    if p.pp == 1:
        return 1
    micro = p.pp_microbatches or p.pp
    return micro if p.pp_schedule == "gpipe" else min(p.pp, micro)


def _encoder_decoder_extra(recipe: Recipe, s: _Sizes, encoder: _Shape, dec_len: int) -> tuple[int, int, int]:
    """(embedding bytes, layer bytes, output tokens) the decoder stack adds: its embedded inputs, its blocks with
    cross-attention to the encoder output, and the encoder's final norm (the decoder's is in the head)."""
    cfg, p = recipe.model, recipe.parallel
    decoder = _Shape(encoder.batch, dec_len // p.cp, causal=True)
    embeddings = _embedding_bytes(cfg, s, decoder, token_types=False)
    layers = _stack_bytes(recipe, s, decoder, math.ceil(cfg.decoder_layers / p.pp), encoder.seq)
    if cfg.has_final_norm:
        layers += _norm_bytes(cfg, s, encoder.tokens, cfg.d_model, FP32)
    return embeddings, layers, decoder.tokens


def activation_breakdown(recipe: Recipe, *, device: str | None = None) -> dict[str, int]:
    """Bytes saved for backward by one micro-batch on one rank: embeddings, stacks, head and loss, and autocast's
    weight copies. device: "cpu" or "cuda" (None = recipe.train.device, "auto" planning for CUDA)."""
    cfg, s, p, data = recipe.model, _sizes(recipe, device), recipe.parallel, recipe.data
    enc_len, dec_len = sequence_lengths(recipe)
    first = _Shape(
        recipe.train.micro_batch_size,
        enc_len // p.cp,
        cfg.causal,
        data.document_masking,
        data.objective == "prefix",
        ring=p.cp_ring > 1,
    )
    embeddings = _embedding_bytes(cfg, s, first, token_types=True)
    layers = _stack_bytes(recipe, s, first, math.ceil(cfg.n_layers / p.pp), None)
    out_tokens = first.tokens
    if dec_len is not None:
        extra_embeddings, extra_layers, out_tokens = _encoder_decoder_extra(recipe, s, first, dec_len)
        embeddings, layers = embeddings + extra_embeddings, layers + extra_layers
    return {
        "embeddings": embeddings,
        "layers": layers * _pipeline_in_flight(recipe),
        "head_and_loss": _head_bytes(recipe, s, out_tokens),
        "mtp": _mtp_bytes(recipe, s, first),
        "weight_copies": _weight_copies(recipe, s),
    }


def _mtp_bytes(recipe: Recipe, s: _Sizes, shape: _Shape) -> int:
    """Multi-token prediction (model.mtp), on the last stage: per depth the shifted ids, enorm and hnorm, eh_proj's
    [tokens, 2d] input, one block (the main stack's mean block, not checkpointed) and a second head and loss.
    Kept by the last stage for its in-flight micro-batches, which 1F1B bounds at one (its forward is followed by
    that micro-batch's backward)."""
    cfg, p = recipe.model, recipe.parallel
    if cfg.mtp is None:
        return 0
    tokens, d = shape.tokens, cfg.d_model
    block = _mean_block_bytes(cfg, s, shape, None)
    per_block = block["split"] / p.tp + block["sequence"] / (p.tp if p.sequence_parallel else 1)
    inputs = (
        tokens * INDEX + 2 * _norm_bytes(cfg, s, tokens, d, FP32) + _linear_input_bytes(s, tokens, 2 * d, 1)
    )
    return int(cfg.mtp.depth * (inputs + per_block + _head_bytes(recipe, s, tokens)))


def _fsdp_gathers(recipe: Recipe) -> bool:
    """The native engine shards the weights with FSDP2 / HSDP over more than one rank."""
    p = recipe.parallel
    return p.engine == "native" and p.data_parallel != "ddp" and shard_degree(recipe) > 1


def _weight_copies(recipe: Recipe, s: _Sizes) -> int:
    """Copies of the weights a rank computes with, besides its parameters (of its tp / pp share).
    Unsharded: autocast keeps one low-precision copy of every weight matrix (cached per forward, freed by
    backward). FSDP2 over more than one rank: its MixedPrecisionPolicy all-gathers each unit in the compute dtype
    (autocast then has nothing to cast) and frees a block's weights after its forward and its backward; the root
    unit (embeddings, final norms, head) stays gathered from forward to backward (FSDP2 does not reshard the root
    after forward), and at most two blocks are gathered at once (the one computing and the one prefetched); with
    expert parallelism a block's routed experts are this rank's n_experts / ep."""
    cfg, p = recipe.model, recipe.parallel
    if not _fsdp_gathers(recipe):
        return (
            int(matmul_params(cfg) * s.compute * _weight_fraction(recipe, sharded=False)) if s.autocast else 0
        )
    root = param_counts(cfg)["total"] - sum(block_params(cfg))
    in_flight = sum(sorted(block_params(cfg, expert_shards=p.ep), reverse=True)[:2])
    return int((root + in_flight) * s.compute / p.tp)


def memory_per_rank(recipe: Recipe, *, device: str | None = None) -> dict[str, int]:
    """Bytes one rank needs to train `recipe`: parameters, gradients, optimizer_state, activations, total."""
    fraction = _weight_fraction(recipe)
    params = param_counts(recipe.model)["total"] * fraction
    out = {
        "parameters": int(params * FP32),
        "gradients": int(params * FP32),
        "optimizer_state": int(optimizer_state_elements(recipe) * fraction * FP32),
        "activations": sum(activation_breakdown(recipe, device=device).values()),
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------- does it fit
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Fit:
    """What one device must hold at least to train a recipe, and what it has."""

    need: int
    """Bytes: the whole per-rank estimate with one process; with more, parameters + gradients + optimizer state
    spread perfectly over every rank (no layout can do better), times the ranks sharing one CPU's memory."""
    what: str
    """Which terms `need` counts, for the message."""
    limit: int
    """Bytes the device has: a GPU's total memory, or the CPU's RAM (its cgroup limit when lower)."""
    where: str
    """The device, for the message."""

    @property
    def fits(self) -> bool:
        return self.need <= self.limit


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def fit_of(recipe: Recipe, world_size: int, device: str, *, limit: tuple[int, str] | None = None) -> Fit:
    """The memory `recipe` needs on one `device` ("cpu", "cuda" or "cuda:N") with `world_size` ranks, against
    what it has (`limit` = (bytes, description) instead of asking the device). Pure arithmetic on the config:
    nothing is allocated. Raises ConfigError when the sizes overflow int64."""
    kind = device.split(":")[0]
    counts = param_counts(recipe.model)
    state = (counts["total"] * 2 + optimizer_state_elements(recipe)) * FP32  # parameters, gradients, state
    if state > INT64_MAX:
        raise ConfigError(
            None, "model", f"{counts['total']:,} parameters", "the model's sizes overflow a 64-bit integer",
            "use a smaller model (model.d_model, ffn_hidden, n_layers, vocab_size)",
        )  # fmt: skip
    if world_size == 1:  # one process applies no layout (framework/run.py), so the estimate is exact
        one = dataclasses.replace(recipe.launch, nproc_per_node=1, nnodes=1)
        single = dataclasses.replace(recipe, parallel=_single_process_layout(recipe), launch=one)
        estimate = memory_per_rank(single, device=kind)
        need, what = (
            estimate["total"],
            "parameters, gradients, optimizer state and activations in one process",
        )
    else:
        estimate = {"activations": 0}
        need, what = (
            -(-state // world_size),
            f"parameters, gradients and optimizer state over {world_size} ranks",
        )
    if kind == "cuda" and _offloaded(recipe, world_size):  # the state lives in CPU memory
        need, what = estimate["activations"], "activations (the state is offloaded to the CPU)"
    if kind == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", recipe.launch.nproc_per_node if world_size > 1 else 1))
        need, what = need * local, what + (f", x {local} ranks on this machine" if local > 1 else "")
    limit_bytes, where = limit or device_memory(device)
    return Fit(int(need), what, limit_bytes, where)


def named_gpu_fit(recipe: Recipe) -> Fit | None:
    """The per-rank estimate of `recipe` with its own layout on launch.nnodes x nproc_per_node ranks against the
    memory of the GPU it names (launch.gpu; framework/gpus.py), planning for CUDA; None when it names none. What
    `loom check` reports for a recipe written for a cluster, wherever it is checked."""
    if recipe.launch.gpu is None:
        return None
    gpu, world = gpu_named(recipe.launch.gpu), _world_size(recipe)
    estimate = memory_per_rank(recipe, device="cuda")
    need, what = estimate["total"], f"the estimate per rank of {world}"
    if _offloaded(recipe, world):
        need, what = estimate["activations"], what + ", activations only (the state is offloaded to the CPU)"
    return Fit(need, what, gpu.memory_bytes, gpu.name)


def _offloaded(recipe: Recipe, world_size: int) -> bool:
    """FSDP's cpu_offload (multi-process only) or DeepSpeed's optimizer / parameter offload."""
    ds = recipe.deepspeed
    deepspeed = recipe.parallel.engine == "deepspeed" and "cpu" in (ds.offload_optimizer, ds.offload_params)
    return deepspeed or (recipe.parallel.cpu_offload and world_size > 1)


def _single_process_layout(recipe: Recipe) -> ParallelConfig:
    """The parallel section as one process runs it: every size 1, activation checkpointing kept."""
    return dataclasses.replace(
        recipe.parallel, dp_replicate=1, dp_shard=-1, tp=1, pp=1, cp=1, ep=1, pp_microbatches=None,
        pp_layers=None, sequence_parallel=False, cpu_offload=False,
    )  # fmt: skip


def check_fits(recipe: Recipe, world_size: int, device: str) -> Fit:
    """Refuse, before anything is allocated, a recipe whose model cannot fit `device` with `world_size` ranks
    (ConfigError naming the model's size, the need and the limit, and the fixes). Returns the Fit."""
    fit = fit_of(recipe, world_size, device)
    if not fit.fits:
        m, total = recipe.model, param_counts(recipe.model)["total"]
        raise ConfigError(
            None,
            "model",
            f"{total:,} parameters",
            f"(d_model {m.d_model}, n_layers {m.n_layers}, vocab_size {m.vocab_size}) needs {_gib(fit.need)} "
            f"({fit.what}) but {fit.where} has {_gib(fit.limit)}",
            "use a smaller model (model.d_model, ffn_hidden, n_layers, vocab_size), more ranks (--nproc, "
            "launch.nnodes) with a sharded layout (parallel.data_parallel: fsdp, tp, pp), "
            "or parallel.activation_checkpointing",
        )
    return fit


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, description) of a device's memory: a GPU's total (not what is free now: other processes come
    and go), or the machine's RAM, lowered to the cgroup's limit inside a container."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", 0))
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"cuda:{index} ({props.name})"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < ram:
        return cgroup, "this machine's memory (cgroup limit)"
    return ram, "this machine's RAM"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None
