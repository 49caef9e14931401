"""Recipe sections: one typed dataclass per section, each field documented by the string under it.

The loader (`framework.config.loader`) turns YAML into these classes, checking every key and type; each section's
`validate()` then checks ranges and rules between fields, raising `ConfigError` with the dotted key. Rules that
span sections live in `Recipe.validate()`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from framework.config.errors import ConfigError
from framework.gpus import GPU_NAMES


def _require(ok: bool, key: str, value: object, rule: str, fix: str) -> None:
    """Raise a ConfigError (file filled in by the loader) unless `ok`."""
    if not ok:
        raise ConfigError(None, key, value, rule, fix)


def _positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None:
            _require(value > 0, f"{prefix}.{name}", value, "must be > 0", "use a positive number")


def _non_negative(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, f"{prefix}.{name}", value, "must be >= 0", "use 0 or a positive number")


# Upper bounds of sizes and counts. Each is far above any real model or run, and low enough that what is computed
# per layer, per step or per divisor stays fast and every product of sizes stays far inside int64. Whether a
# model of allowed sizes fits a device is checked separately, against the device, before anything is allocated
# (framework/models/memory.py: check_fits).
MAX_LAYERS = 10_000
"""model.n_layers, n_decoder_layers, moe.every, moe.first_dense: counting and building go layer by layer."""
MAX_WIDTH = 2**20
"""model.d_model, ffn_hidden, head_dim, moe.expert_hidden (the widest published models are below 2**16)."""
MAX_HEADS = 2**16
"""model.n_heads, kv_heads, moe.n_experts, n_shared_experts, n_groups, topk_groups."""
MAX_VOCAB = 2**24
"""model.vocab_size, type_vocab_size (tokenizers have at most a few 10**5 pieces)."""
MAX_TOKENS = 2**24
"""model.max_seq_len, rope_original_max_seq_len, sliding_window, relative_*, data.seq_len (16.7M tokens)."""
MAX_STEPS = 2**40
"""train.steps and every step count or interval (eval, checkpoints, logging, warmup, loss-scale growth)."""
MAX_BATCH = 2**24
"""train.global_batch_size, micro_batch_size, eval_batches, spike_window (sequences, batches, steps kept)."""
MAX_RANKS = 2**20
"""parallel.dp_replicate, dp_shard, tp, pp, cp, ep, pp_microbatches."""


def _at_most(section: object, prefix: str, limit: int, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None:
            _require(
                value <= limit,
                f"{prefix}.{name}",
                value,
                f"must be at most {limit:,} (a bound far above any real setting; see framework/config/schema.py)",
                "use a realistic value",
            )


def _fraction(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(
            0.0 <= value < 1.0, f"{prefix}.{name}", value, "must be in [0, 1)", "use a fraction like 0.1"
        )


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (`model.moe`; null = a dense model). Selected layers replace the MLP
    with a router, `n_experts` routed experts (each a copy of the model's MLP type, width `expert_hidden`) and
    optional always-on shared experts. Layer i is MoE when i >= first_dense and (i - first_dense) % every == 0."""

    n_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to (Switch: 1; GShard/Mixtral: 2; fine-grained models: 6-8)."""
    expert_hidden: int | None = None
    """Hidden width of one routed expert (per branch for gated MLPs); null = model.ffn_hidden. Fine-grained
    experts (DeepSeekMoE, Qwen3-MoE) use a width much smaller than a dense MLP's."""
    n_shared_experts: int = 0
    """Always-on shared experts (DeepSeekMoE), run as one MLP of width n_shared_experts x expert_hidden."""
    shared_expert_hidden: int | None = None
    """Width of that one shared MLP when it is not n_shared_experts x expert_hidden (Qwen3-Next's
    shared_expert_intermediate_size); needs n_shared_experts > 0; null = n_shared_experts x expert_hidden."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(x w_g), w_g a learned d_model vector (Qwen2-MoE and
    Qwen3-Next's shared_expert_gate); needs n_shared_experts > 0."""
    every: int = 1
    """Every this many layers (counted from first_dense) is an MoE layer; the others are dense."""
    first_dense: int = 0
    """The first this many layers keep a dense MLP (width model.ffn_hidden), as in DeepSeek-V2/V3."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts (Switch, Mixtral, Qwen3-MoE) or per-expert sigmoid (DeepSeek-V3)."""
    n_groups: int = 1
    """Group-limited routing (DeepSeek-V3): experts split into this many groups; 1 = no grouping."""
    topk_groups: int = 1
    """Group-limited routing: a token picks its top_k experts only from its best topk_groups groups, a group
    scoring the sum of its two best expert scores."""
    renormalize: bool = True
    """Divide the top_k weights by their sum (Mixtral, Qwen3-MoE norm_topk_prob, DeepSeek-V3). With the softmax
    router this is exactly a softmax over the top_k logits alone (gpt-oss's softmax after top-k)."""
    route_scale: float = 1.0
    """Multiplier of the routed experts' weights (DeepSeek-V3: routed_scaling_factor 2.5)."""
    jitter: float = 0.0
    """Training only: multiply the router input by U(1 - jitter, 1 + jitter) noise (Switch Transformer); 0 = off."""
    capacity_factor: float | None = None
    """Token dropping: each expert takes at most ceil(capacity_factor x tokens x top_k / n_experts) assignments of
    a micro-batch; first choices before second choices, then token order (GShard). null = dropless."""
    aux_loss: float = 0.01
    """Coefficient of the load-balancing loss n_experts x sum_i f_i x P_i (Switch/GShard; 1.0 at uniform
    routing), averaged over MoE layers; 0 = off."""
    aux_loss_scope: Literal["micro_batch", "global_batch", "sequence"] = "micro_batch"
    """Tokens f_i and P_i are counted over: each micro-batch, the whole optimizer step's batch (Qwen's
    global-batch balancing), or each sequence (DeepSeek-V3's complementary sequence-wise loss)."""
    z_loss: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE uses 0.001); 0 = off."""
    router_bias: bool = False
    """A bias on the router's linear layer (gpt-oss)."""
    expert_linear_bias: bool = False
    """Biases on every expert's linear layers (gpt-oss), independent of model.bias."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step, each expert's selection bias moves
    by this rate towards balance (sign of mean load - its load); 0 = off (no bias unless expert_bias)."""
    expert_bias: bool = False
    """Keep the per-expert selection bias (the router's `expert_bias` buffer) even when bias_update_rate is 0: a
    trained router's fixed bias (GLM-4.5 / DeepSeek-V3 e_score_correction_bias), which steers selection only."""

    @property
    def has_expert_bias(self) -> bool:
        """Whether the router holds an `expert_bias` buffer (updated only when bias_update_rate > 0)."""
        return self.expert_bias or self.bias_update_rate > 0

    def resolved_expert_hidden(self, ffn_hidden: int) -> int:
        return self.expert_hidden if self.expert_hidden is not None else ffn_hidden

    def resolved_shared_hidden(self, ffn_hidden: int) -> int:
        """Width of the shared experts' MLP (0 without shared experts)."""
        if self.shared_expert_hidden is not None and self.n_shared_experts > 0:
            return self.shared_expert_hidden
        return self.n_shared_experts * self.resolved_expert_hidden(ffn_hidden)

    def validate(self, n_layers: int) -> None:
        p = "model.moe"
        _positive(self, p, "n_experts", "top_k", "expert_hidden", "every", "n_groups", "topk_groups")
        _positive(self, p, "route_scale", "capacity_factor")
        _non_negative(self, p, "n_shared_experts", "first_dense", "aux_loss", "z_loss", "bias_update_rate")
        _fraction(self, p, "jitter")
        _at_most(self, p, MAX_HEADS, "n_experts", "n_shared_experts", "n_groups", "topk_groups")
        _at_most(self, p, MAX_WIDTH, "expert_hidden")
        self._validate_shared()
        _at_most(self, p, MAX_LAYERS, "every", "first_dense")
        _require(
            self.top_k <= self.n_experts,
            f"{p}.top_k",
            self.top_k,
            f"a token cannot pick more than model.moe.n_experts={self.n_experts} experts",
            f"use a top_k of at most {self.n_experts}",
        )
        _require(
            self.first_dense < n_layers,
            f"{p}.first_dense",
            self.first_dense,
            f"leaves no MoE layer among model.n_layers={n_layers}",
            f"use a first_dense below {n_layers}, or remove model.moe for a dense model",
        )
        self._validate_groups()

    def _validate_shared(self) -> None:
        p = "model.moe"
        _positive(self, p, "shared_expert_hidden")
        _at_most(self, p, MAX_WIDTH, "shared_expert_hidden")
        for key in ("shared_expert_hidden", "shared_expert_gate"):
            value = getattr(self, key)
            _require(
                self.n_shared_experts > 0 or value in (None, False), f"{p}.{key}", value,
                "describes the shared experts, but model.moe.n_shared_experts is 0",
                f"set model.moe.n_shared_experts (e.g. 1) or remove model.moe.{key}",
            )  # fmt: skip

    def _validate_groups(self) -> None:
        p = "model.moe"
        _require(
            self.n_experts % self.n_groups == 0,
            f"{p}.n_groups",
            self.n_groups,
            f"must divide model.moe.n_experts={self.n_experts} (groups are equal slices of the experts)",
            f"use a divisor of {self.n_experts}, e.g. {_divisors(self.n_experts)}",
        )
        _require(
            self.topk_groups <= self.n_groups,
            f"{p}.topk_groups",
            self.topk_groups,
            f"cannot exceed model.moe.n_groups={self.n_groups}",
            f"use at most {self.n_groups}",
        )
        reachable = self.topk_groups * self.n_experts // self.n_groups
        _require(
            self.top_k <= reachable,
            f"{p}.top_k",
            self.top_k,
            f"exceeds the {reachable} experts in the topk_groups={self.topk_groups} groups a token may use",
            "raise model.moe.topk_groups or lower top_k",
        )


MixerName = Literal["attention", "attention_local", "gdn", "mamba2", "mla"]
"""A block's sequence mixer (framework/models/mixers.py holds the registry)."""


@dataclass
class GDNConfig:
    """Gated DeltaNet layers (Yang et al. 2024; Qwen3-Next's linear attention), `model.gdn`. Each value head
    keeps a key_head_dim x value_head_dim state updated by the gated delta rule
    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T, read out as o_t = S_t^T q_t."""

    heads: int = 8
    """Value heads (Qwen3-Next linear_num_value_heads); each has its own state, decay and beta."""
    key_heads: int | None = None
    """Query/key heads, each shared by heads / key_heads value heads; null = heads."""
    key_head_dim: int = 64
    """Width of one query/key head (linear_key_head_dim)."""
    value_head_dim: int = 64
    """Width of one value head (linear_value_head_dim)."""
    conv_kernel: int = 4
    """Taps of the causal depthwise convolution over q, k and v (linear_conv_kernel_dim)."""
    chunk_size: int = 64
    """Tokens per chunk of the chunked (WY) training form; the state is carried between chunks."""

    @property
    def resolved_key_heads(self) -> int:
        return self.key_heads if self.key_heads is not None else self.heads

    def validate(self) -> None:
        p = "model.gdn"
        _positive(
            self, p, "heads", "key_heads", "key_head_dim", "value_head_dim", "conv_kernel", "chunk_size"
        )
        _at_most(self, p, MAX_HEADS, "heads", "key_heads")
        _at_most(self, p, MAX_WIDTH, "key_head_dim", "value_head_dim", "conv_kernel", "chunk_size")
        _require(
            self.heads % self.resolved_key_heads == 0, f"{p}.key_heads", self.key_heads,
            f"model.gdn.heads={self.heads} must be divisible by key_heads (each key head serves a group)",
            f"use a divisor of {self.heads}, e.g. {_divisors(self.heads)}",
        )  # fmt: skip


@dataclass
class Mamba2Config:
    """Mamba-2 layers (Dao & Gu 2024, SSD), `model.mamba2`. Each head keeps a head_dim x state_dim state with a
    scalar decay per token: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""

    heads: int = 8
    """SSM heads (num_heads); the inner width is heads x head_dim (expand x d_model in Mamba's terms)."""
    head_dim: int = 64
    """Channels per head (head_dim)."""
    state_dim: int = 64
    """SSM state size N per head (d_state / ssm_state_size)."""
    groups: int = 1
    """B/C groups (n_groups), each shared by heads / groups heads, as GQA shares keys."""
    conv_kernel: int = 4
    """Taps of the causal depthwise convolution over x, B and C (d_conv)."""
    conv_bias: bool = True
    """Bias on the depthwise convolution (Mamba-2's default)."""
    chunk_size: int = 64
    """Tokens per chunk of the chunked SSD form."""
    dt_min: float = 0.001
    """Initial dt is log-uniform in [dt_min, dt_max] (through dt_bias = softplus^-1(dt))."""
    dt_max: float = 0.1
    """See dt_min."""

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    def validate(self) -> None:
        p = "model.mamba2"
        _positive(self, p, "heads", "head_dim", "state_dim", "groups", "conv_kernel", "chunk_size")
        _positive(self, p, "dt_min", "dt_max")
        _at_most(self, p, MAX_HEADS, "heads", "groups")
        _at_most(self, p, MAX_WIDTH, "head_dim", "state_dim", "conv_kernel", "chunk_size")
        _require(
            self.heads % self.groups == 0, f"{p}.groups", self.groups,
            f"model.mamba2.heads={self.heads} must be divisible by groups (each group serves a block of heads)",
            f"use a divisor of {self.heads}, e.g. {_divisors(self.heads)}",
        )  # fmt: skip
        _require(
            self.dt_min <= self.dt_max, f"{p}.dt_min", self.dt_min,
            f"must not exceed model.mamba2.dt_max={self.dt_max}", "swap dt_min and dt_max",
        )  # fmt: skip


@dataclass
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 section 2.1), `model.mla`, with model.n_heads heads. Keys and
    values come from one compressed latent c = norm(x W_dkv) of kv_lora_rank channels; each head's key is its
    up-projected qk_nope_head_dim channels joined by qk_rope_head_dim RoPE channels shared by all heads (from x
    directly); values are v_head_dim wide. Queries are compressed the same way when q_lora_rank is set."""

    kv_lora_rank: int = 512
    """Width of the joint key/value latent (DeepSeek-V3: 512)."""
    q_lora_rank: int | None = None
    """Width of the query latent; null = queries projected from x directly (DeepSeek-V2-Lite)."""
    qk_nope_head_dim: int = 128
    """Per-head query/key channels without position (up-projected from the latent)."""
    qk_rope_head_dim: int = 64
    """Per-head query channels, and the one shared key part, that RoPE rotates (decoupled RoPE)."""
    v_head_dim: int = 128
    """Per-head value (and attention output) channels."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        p = "model.mla"
        _positive(
            self, p, "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"
        )
        _at_most(self, p, MAX_WIDTH, "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim")
        _at_most(self, p, MAX_WIDTH, "qk_rope_head_dim")
        _require(
            self.qk_rope_head_dim % 2 == 0, f"{p}.qk_rope_head_dim", self.qk_rope_head_dim,
            "RoPE rotates pairs of channels", "use an even qk_rope_head_dim",
        )  # fmt: skip


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2), `model.mtp`. Depth k (1..depth) predicts the token k+1
    positions ahead: one block over eh_proj([enorm(embed(t_{i+k})); hnorm(h^{k-1}_i)]), h^0 the main stack's
    normed output, then its own norm and the shared output head. Loss = main + loss_weight x mean_k loss_k.
    Family decoder only; trained by the native engine, not with parallel.cp > 1 (nor a tied head under tp > 1).
    Evaluation and validation loss use the main next-token head only (framework/models/mtp.py)."""

    depth: int = 1
    """Extra prediction depths D, one block each."""
    loss_weight: float = 0.3
    """lambda: weight of the mean MTP loss (DeepSeek-V3: 0.3, later 0.1)."""

    def validate(self) -> None:
        p = "model.mtp"
        _positive(self, p, "depth")
        _at_most(self, p, MAX_LAYERS, "depth")
        _non_negative(self, p, "loss_weight")


@dataclass
class LayersConfig:
    """Per-layer structure of a decoder (`model.layers`): which sequence mixer each block runs."""

    pattern: list[MixerName] = field(default_factory=lambda: ["attention"])
    """Sequence mixers of blocks 0, 1, 2, ..., repeated from the start until model.n_layers blocks are named
    (a full list of n_layers names is also accepted, e.g. Gemma 3's). attention: the model's attention (window
    model.sliding_window unless the block is in full_attention_layers); attention_local: attention with
    local_window and local_rope_theta (Gemma 3's local layers); gdn: Gated DeltaNet (model.gdn); mamba2: a
    Mamba-2 SSD layer (model.mamba2). [gdn, gdn, gdn, attention] is Qwen3-Next's 3:1 hybrid."""
    local_window: int | None = None
    """attention_local's sliding window (keys a query sees, itself included); null = model.sliding_window."""
    local_rope_theta: float | None = None
    """attention_local's RoPE base frequency, without rope scaling (Gemma 3: 10000); null = model.rope_theta."""
    feed_forward: bool = True
    """false: blocks hold only their mixer, no feed-forward branch (plain Mamba-2)."""

    def mixer(self, index: int) -> MixerName:
        return self.pattern[index % len(self.pattern)]


@dataclass
class ModelConfig:
    """The architecture. Everything here is a property of the weights, not of how they are trained."""

    family: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """decoder: causal LM (GPT/Llama); encoder: bidirectional masked LM (BERT); encoder_decoder: T5-style."""
    vocab_size: int = 32000
    """Rows of the token embedding and output head; must cover the tokenizer's vocabulary."""
    d_model: int = 512
    """Width of the residual stream (hidden size)."""
    n_layers: int = 8
    """Transformer blocks (the encoder's blocks for encoder_decoder)."""
    n_decoder_layers: int | None = None
    """encoder_decoder only: decoder blocks; null means n_layers."""
    n_heads: int = 8
    """Attention (query) heads."""
    kv_heads: int | None = None
    """Key/value heads: n_heads is multi-head, 1 is multi-query, anything between is grouped-query. null = n_heads."""
    head_dim: int | None = None
    """Width of one head; null means d_model // n_heads. Set it when it differs (Qwen3, T5)."""
    ffn_hidden: int = 1376
    """Hidden width of the feed-forward block (per branch for gated MLPs)."""
    mlp: Literal["relu", "gelu", "swiglu", "geglu", "clamped_swiglu"] = "swiglu"
    """Feed-forward type: plain ReLU/GELU (2 matrices) or gated SwiGLU/GeGLU (3 matrices)."""
    gelu_approximate: Literal["none", "tanh"] = "none"
    """GELU form for gelu/geglu: exact erf ('none', BERT) or the tanh approximation (T5 v1.1, GPT-2)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer type."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance in every norm."""
    norm_position: Literal["pre", "post", "reordered"] = "pre"
    """pre: x + f(norm(x)) with a final norm (GPT-2/Llama); post: norm(x + f(x)) (original Transformer, BERT);
    reordered: x + norm(f(x)) with a final norm, each branch's output normalised instead of its input (OLMo 2)."""
    qk_norm: bool = False
    """Normalise queries and keys before attention (Qwen3 per head, OLMo 2 over the whole projection)."""
    qk_norm_scope: Literal["head", "projection"] = "head"
    """qk_norm over each head's head_dim channels, one gain shared by the heads (Qwen3), or over the whole q and
    k projections, n_heads x head_dim and kv_heads x head_dim gains (OLMo 2; not with parallel.tp > 1, where
    the projections are split by heads)."""
    norm_weight_offset: bool = False
    """RMSNorm stores its gain as an offset from 1: y = x_hat * (1 + w), with w initialised to 0, and the product
    taken in float32 before the cast back to the input dtype (Gemma). false: y = x_hat * w, w initialised to 1."""
    sandwich_norm: bool = False
    """With norm_position pre: also normalise each branch's output before the residual add,
    x + norm2(f(norm1(x))) (Gemma 2's post-attention and post-feedforward norms)."""
    bias: bool = False
    """Biases in the attention and feed-forward linear layers."""
    bias_scope: Literal["all", "qkv"] = "all"
    """Which linear layers `bias: true` gives a bias: all (attention and feed-forward: GPT-2, BLOOM, BERT) or qkv
    (only the query, key and value projections, none on the attention output or the MLP: Qwen2)."""
    position: Literal["rope", "alibi", "sinusoidal", "learned", "relative_bias", "none"] = "rope"
    """Position scheme: rotary, ALiBi linear biases, fixed sinusoidal table, learned table, T5 relative bias, none."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """RoPE context extension: none; linear position interpolation; Llama-3.1 frequency-dependent scaling; YaRN
    (Peng et al. 2023: NTK-by-parts interpolation plus an attention temperature; DeepSeek-V3, gpt-oss)."""
    rope_scaling_factor: float = 1.0
    """Scaling factor for rope_scaling (linear: positions divided by it; llama3: long wavelengths divided by it)."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope scaling: wavelengths above original_len / low_freq_factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope scaling: wavelengths below original_len / high_freq_factor are left unscaled."""
    rope_original_max_seq_len: int = 8192
    """llama3 and yarn rope scaling: context length the model was originally trained with."""
    rope_yarn_beta_fast: float = 32.0
    """yarn: rotations over the original context above which a frequency is left unscaled (beta_fast)."""
    rope_yarn_beta_slow: float = 1.0
    """yarn: rotations over the original context below which a frequency is fully interpolated (beta_slow)."""
    rope_yarn_mscale: float | None = None
    """yarn: DeepSeek's mscale; with rope_yarn_mscale_all_dim it sets the cos/sin factor
    m(mscale) / m(mscale_all_dim), m(s) = 0.1 s ln(factor) + 1; null (both) = 0.1 ln(factor) + 1."""
    rope_yarn_mscale_all_dim: float | None = None
    """yarn: DeepSeek's mscale_all_dim; MLA also multiplies its softmax scale by m(mscale_all_dim)^2."""
    rope_yarn_truncate: bool = True
    """yarn: round the correction range to whole dimensions (gpt-oss sets false)."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts (size of learned/sinusoidal tables and of the RoPE cache)."""
    relative_buckets: int = 32
    """relative_bias (T5): number of relative-position buckets."""
    relative_max_distance: int = 128
    """relative_bias (T5): distance beyond which all positions share the last bucket."""
    sliding_window: int | None = None
    """Attend only to the last `sliding_window` keys (Mistral); null = unlimited."""
    full_attention_layers: list[int] | None = None
    """With sliding_window, family decoder: the blocks (0-based, increasing) that attend to every earlier key
    instead, e.g. [1, 3, 5, ...] for Gemma 2's alternating local and global layers; null = the window applies to
    every block."""
    attention_backend: Literal["sdpa", "flex", "naive"] = "sdpa"
    """Attention kernel: torch SDPA (flash when the mask is plain causal), FlexAttention (block masks, score mods;
    forward-only on CPU), naive (reference; materialises the scores)."""
    kernels: Literal["auto", "torch", "te"] = "auto"
    """Kernel library for attention. torch: attention_backend above. te: NVIDIA Transformer Engine's fused
    DotProductAttention in every attention layer (CUDA and the `gpu` extra only). auto: te when Transformer Engine
    imports, the device is CUDA and the recipe maps to it, else torch. Resolved at run time (docs/kernels.md)."""
    softmax_scale: Literal["inv_sqrt_dk", "none"] | float = "inv_sqrt_dk"
    """Scale of q.k before softmax: 1/sqrt(head_dim), none (1.0, T5), or a number."""
    attention_temperature: float = 1.0
    """Soft masking: divide attention scores by this temperature (1.0 = plain attention)."""
    learned_temperature: bool = False
    """Soft masking: learn one temperature per head (initialised to attention_temperature)."""
    soft_distance_bias: bool = False
    """Soft masking: learned per-head bias -w_h * |i - j| that down-weights distant keys instead of cutting them
    (w_h starts at 0, so the model starts as plain attention)."""
    dropout: float = 0.0
    """Dropout on the residual branches and embeddings."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings, BERT style; 0 = none."""
    embedding_norm: bool = False
    """Normalise the embeddings before the first block (BERT, BLOOM)."""
    mlm_head_transform: bool = False
    """BERT masked-LM head: dense + activation + norm before the output projection."""
    output_bias: bool = False
    """Bias on the output projection (BERT)."""
    embedding_scale: Literal["none", "sqrt_d_model"] = "none"
    """Multiply the token embeddings by sqrt(d_model), rounded to the compute dtype first as Gemma does; none
    leaves them as looked up."""
    final_logit_softcap: float | None = None
    """Soft-cap the output logits to (-c, c): c * tanh(logits / c) (Gemma 2); null = no cap."""
    attention_softcap: float | None = None
    """Soft-cap the scaled attention scores before the bias, mask and softmax: c * tanh(scale * q.k / c)
    (Gemma 2). SDPA has no such score modification, so these calls run FlexAttention or the naive reference
    (docs/kernels.md); null = no cap."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weight matrices."""
    init_depth_scaled: bool = True
    """Output projections (attention out, MLP down) use init_std / sqrt(2 * layers) (GPT-2)."""
    embedding_init_std: float | None = None
    """Std of the embedding init; null = init_std. Small values give the small-init embeddings of Nguyen & Salazar."""
    moe: MoEConfig | None = None
    """Mixture-of-Experts layers (see MoEConfig); null = every feed-forward block is a dense MLP."""
    layers: LayersConfig | None = None
    """Per-layer sequence mixers (see LayersConfig); null = every block is attention."""
    gdn: GDNConfig | None = None
    """Gated DeltaNet settings, for the gdn blocks of model.layers.pattern."""
    mamba2: Mamba2Config | None = None
    """Mamba-2 settings, for the mamba2 blocks of model.layers.pattern."""
    attention_gate: bool = False
    """Gated attention output (Qwen3-Next): the attention output is multiplied by sigmoid(x W_g), one gate per
    output channel of every head, before the output projection."""
    mla: MLAConfig | None = None
    """Multi-head Latent Attention settings, for the mla blocks of model.layers.pattern (DeepSeek-V2/V3)."""
    mtp: MTPConfig | None = None
    """Multi-token prediction heads (DeepSeek-V3); null = next-token prediction only."""
    attention_sinks: bool = False
    """A learned logit per attention head that joins every query's softmax denominator with no value (gpt-oss;
    Xiao et al. 2023): p_ij = exp(s_ij) / (sum_k exp(s_ik) + exp(sink_h))."""
    swiglu_limit: float = 7.0
    """clamped_swiglu (gpt-oss): the gate is clamped to at most this, the up projection to [-limit, limit]."""
    swiglu_alpha: float = 1.702
    """clamped_swiglu: out = (up + 1) * gate * sigmoid(alpha * gate)."""
    rope_fraction: float = 1.0
    """Share of each head's channels that RoPE rotates (the first rope_fraction x head_dim; the rest pass
    unchanged): partial rotary, 0.25 in Qwen3-Next, 0.5 in Bamba."""
    hf_architecture: Literal["auto", "phi3"] = "auto"
    """Hugging Face family `loom convert --to hf` writes: auto (the one the fields above pick: Llama for a plain
    RoPE decoder) or phi3 (the same Llama weights as Phi3ForCausalLM's fused qkv_proj and gate_up_proj). Only the
    file layout differs; importing a Phi-3 folder sets it, so the model exports back as Phi-3."""

    @property
    def resolved_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def has_final_norm(self) -> bool:
        """A norm after the last block: pre-norm and reordered stacks end on an un-normalised residual stream."""
        return self.norm_position in ("pre", "reordered")

    @property
    def dense_bias(self) -> bool:
        """Biases on the attention output and feed-forward layers (bias_scope all); q/k/v follow `bias` alone."""
        return self.bias and self.bias_scope == "all"

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` of a stack has an MoE feed-forward (see MoEConfig)."""
        m = self.moe
        return m is not None and index >= m.first_dense and (index - m.first_dense) % m.every == 0

    def mixer(self, index: int) -> MixerName:
        """The sequence mixer of block `index` (model.layers.pattern; attention without one)."""
        return "attention" if self.layers is None else self.layers.mixer(index)

    @property
    def mixers(self) -> list[MixerName]:
        """The sequence mixer of every block of the (decoder) stack."""
        return [self.mixer(i) for i in range(self.n_layers)]

    @property
    def uses_head_dim(self) -> bool:
        """Whether head_dim shapes any block: false for a stack of MLA blocks only (model.mla sets their widths;
        recurrent blocks beside them have their own sections)."""
        return self.mla is None or any(m in ("attention", "attention_local") for m in self.mixers)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE blocks (empty for a dense model)."""
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def validate(self) -> None:
        p = "model"
        _positive(self, p, "vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len")
        _positive(
            self, p, "kv_heads", "head_dim", "n_decoder_layers", "sliding_window", "norm_eps", "rope_theta"
        )
        _positive(self, p, "init_std", "embedding_init_std", "attention_temperature", "rope_scaling_factor")
        _positive(self, p, "relative_buckets", "relative_max_distance")
        _positive(self, p, "final_logit_softcap", "attention_softcap", "swiglu_limit", "swiglu_alpha")
        # llama3 RoPE scaling divides by each of these (framework/models/positions.py: _llama3_scale)
        _positive(self, p, "rope_original_max_seq_len", "rope_low_freq_factor", "rope_high_freq_factor")
        _fraction(self, p, "dropout", "attention_dropout")
        _non_negative(self, p, "type_vocab_size")
        self._validate_bounds()
        if self.head_dim is None and self.uses_head_dim:
            _require(
                self.d_model % self.n_heads == 0,
                "model.d_model",
                self.d_model,
                f"must be divisible by model.n_heads={self.n_heads} when model.head_dim is not set",
                "change d_model or n_heads, or set model.head_dim explicitly",
            )
        _require(
            self.n_heads % self.resolved_kv_heads == 0,
            "model.kv_heads",
            self.kv_heads,
            f"model.n_heads={self.n_heads} must be divisible by kv_heads (each kv head serves a group of q heads)",
            f"use a divisor of {self.n_heads}, e.g. {_divisors(self.n_heads)}",
        )
        if self.position == "rope" and self.uses_head_dim:
            _require(
                self.resolved_head_dim % 2 == 0,
                "model.head_dim",
                self.resolved_head_dim,
                "RoPE rotates pairs of channels, so head_dim must be even",
                "use an even head_dim",
            )
        if isinstance(self.softmax_scale, float):
            _require(
                self.softmax_scale > 0,
                "model.softmax_scale",
                self.softmax_scale,
                "must be > 0",
                "use a positive number",
            )
        _require(
            self.n_decoder_layers is None or self.family == "encoder_decoder",
            "model.n_decoder_layers",
            self.n_decoder_layers,
            "only applies to family encoder_decoder",
            "remove it, or set model.family: encoder_decoder",
        )
        _require(
            self.sliding_window is None or self.family != "encoder",
            "model.sliding_window",
            self.sliding_window,
            "sliding windows are defined here for causal attention only",
            "remove model.sliding_window for encoder models",
        )
        _require(
            self.bias or self.bias_scope == "all",
            "model.bias_scope",
            self.bias_scope,
            "chooses which layers model.bias applies to, but model.bias is false",
            "set model.bias: true (Qwen2: biases on q/k/v only), or remove model.bias_scope",
        )
        _require(
            not self.norm_weight_offset or self.norm == "rmsnorm",
            "model.norm_weight_offset",
            self.norm_weight_offset,
            "is a form of RMSNorm's gain",
            "set model.norm: rmsnorm, or remove model.norm_weight_offset",
        )
        _require(
            self.qk_norm or self.qk_norm_scope == "head",
            "model.qk_norm_scope",
            self.qk_norm_scope,
            "says where qk_norm applies, but model.qk_norm is false",
            "set model.qk_norm: true, or remove model.qk_norm_scope",
        )
        _require(
            not self.sandwich_norm or self.norm_position == "pre",
            "model.sandwich_norm",
            self.sandwich_norm,
            "adds a norm after each branch of a pre-norm block",
            "set model.norm_position: pre, or remove model.sandwich_norm",
        )
        if self.full_attention_layers is not None:
            self._validate_full_attention_layers(self.full_attention_layers)
        if self.moe is not None:
            self._validate_moe(self.moe)
        self._validate_mixers()

    def _validate_mixers(self) -> None:
        """Partial rotary and the per-layer mixer pattern (model.layers with its gdn / mamba2 sections)."""
        _require(
            0 < self.rope_fraction <= 1, "model.rope_fraction", self.rope_fraction,
            "is the share of head_dim that RoPE rotates", "use a number in (0, 1]",
        )  # fmt: skip
        _require(
            not self.uses_head_dim or (self.resolved_head_dim * self.rope_fraction) % 2 == 0,
            "model.rope_fraction", self.rope_fraction,
            f"must rotate an even number of channels of head_dim {self.resolved_head_dim}",
            "pick a fraction that gives an even channel count (e.g. 0.25, 0.5)",
        )  # fmt: skip
        if self.layers is not None:
            self._validate_layers(self.layers)
        if self.mtp is not None:
            self.mtp.validate()
            _require(
                self.family == "decoder", "model.mtp", "set", "predicts further tokens of a causal LM",
                "remove model.mtp, or set model.family: decoder",
            )  # fmt: skip
        if self.layers is not None and "mla" in self.layers.pattern:
            self._validate_mla()

    def _validate_mla(self) -> None:
        """Attention options MLA blocks do not have (model.mla sets their widths; one shared rope key)."""
        ignored = {
            "kv_heads": None, "qk_norm": False, "attention_gate": False, "learned_temperature": False,
            "soft_distance_bias": False, "rope_fraction": 1.0, "attention_temperature": 1.0, "attention_sinks": False,
        }  # fmt: skip
        for key, default in ignored.items():
            value = getattr(self, key)
            _require(
                value == default, f"model.{key}", value,
                "does not apply to mla blocks (MLA shares one latent and one rope key over all heads; its widths "
                "are model.mla's)",
                f"remove model.{key}, or use attention blocks in model.layers.pattern",
            )  # fmt: skip
        _require(
            self.position in ("rope", "none", "learned", "sinusoidal"), "model.position", self.position,
            "mla blocks take no score bias (ALiBi, T5 relative bias)",
            "use position: rope (MLA's decoupled RoPE), or attention blocks",
        )  # fmt: skip

    def _validate_layers(self, layers: LayersConfig) -> None:
        key = "model.layers.pattern"
        _require(
            self.family == "decoder" or set(layers.pattern) == {"attention"}, key, layers.pattern,
            "mixers other than attention are causal, for family decoder only",
            "use pattern [attention], or set model.family: decoder",
        )  # fmt: skip
        _require(
            0 < len(layers.pattern) <= self.n_layers, key, layers.pattern,
            f"needs 1 to model.n_layers={self.n_layers} names (it repeats to fill the stack)",
            "list the mixers of one period, e.g. [gdn, gdn, gdn, attention]",
        )  # fmt: skip
        _positive(layers, "model.layers", "local_window", "local_rope_theta")
        _at_most(layers, "model.layers", MAX_TOKENS, "local_window")
        for name, section in (("gdn", self.gdn), ("mamba2", self.mamba2), ("mla", self.mla)):
            if name in layers.pattern:
                index = layers.pattern.index(name)
                _require(
                    section is not None, f"{key}[{index}]", name,
                    f"a {name} block needs the model.{name} section (its heads and widths)",
                    f"add model.{name}: {{heads: ...}}, or use another mixer at index {index}",
                )  # fmt: skip
                section.validate()
        if "attention_local" in layers.pattern:
            index = layers.pattern.index("attention_local")
            _require(
                layers.local_window is not None or self.sliding_window is not None,
                f"{key}[{index}]", "attention_local",
                "a local attention block needs a window",
                "set model.layers.local_window (or model.sliding_window)",
            )  # fmt: skip
        _require(
            layers.feed_forward or self.moe is None, "model.layers.feed_forward", layers.feed_forward,
            "false removes every feed-forward branch, so model.moe has no layer to replace",
            "remove model.moe, or set model.layers.feed_forward: true",
        )  # fmt: skip

    def _validate_full_attention_layers(self, layers: list[int]) -> None:
        key = "model.full_attention_layers"
        _require(
            self.sliding_window is not None and self.family == "decoder", key, layers,
            "exempts blocks from model.sliding_window, so it needs a window (family decoder)",
            "set model.sliding_window, or remove model.full_attention_layers",
        )  # fmt: skip
        _require(
            all(0 <= i < self.n_layers for i in layers) and layers == sorted(set(layers)), key, layers,
            f"must list block indices 0 .. {self.n_layers - 1} in increasing order, each once",
            "list each full-attention block once, in order",
        )  # fmt: skip

    def _validate_bounds(self) -> None:
        p = "model"
        _at_most(self, p, MAX_LAYERS, "n_layers", "n_decoder_layers")
        _at_most(self, p, MAX_WIDTH, "d_model", "ffn_hidden", "head_dim")
        _at_most(self, p, MAX_HEADS, "n_heads", "kv_heads")
        _at_most(self, p, MAX_VOCAB, "vocab_size", "type_vocab_size")
        _at_most(self, p, MAX_TOKENS, "max_seq_len", "rope_original_max_seq_len", "sliding_window")
        _at_most(self, p, MAX_TOKENS, "relative_buckets", "relative_max_distance")

    def _validate_moe(self, moe: MoEConfig) -> None:
        moe.validate(self.n_layers)
        _require(
            self.family == "decoder",
            "model.moe",
            self.family,
            "MoE layers are implemented for family decoder only",
            "remove model.moe, or set model.family: decoder",
        )
        _require(
            not self.dense_bias or moe.expert_linear_bias,
            "model.bias",
            self.bias,
            "biases on the output and feed-forward layers need biased experts too (moe.expert_linear_bias, as in "
            "gpt-oss); Mixtral, Qwen3-MoE and DeepSeek have none, GLM-4.5 only on q/k/v (bias_scope qkv)",
            "set model.bias: false, model.bias_scope: qkv, or model.moe.expert_linear_bias: true",
        )


def _divisors(n: int, limit: int = 12) -> str:
    """The divisors of n for a fix hint, found up to sqrt(n) (n may be up to 2**63: no loop to n), at most
    `limit` of them."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0] if n <= 2**40 else [1]
    found = sorted({*small, *(n // d for d in small)})
    return ", ".join(str(d) for d in found[:limit]) + (", ..." if len(found) > limit else "")


@dataclass
class ParallelConfig:
    """How the model is laid out over devices. Sizes multiply to the world size (-1 = fill what is left)."""

    engine: Literal["native", "deepspeed"] = "native"
    """Training engine: native (DeviceMesh, FSDP2/HSDP, TP/SP, PP, CP, EP) or deepspeed (ZeRO stages 1-3 with CPU
    offload over every rank as data parallel; configured by the `deepspeed` section, docs/deepspeed.md)."""
    data_parallel: Literal["ddp", "fsdp", "hsdp"] = "fsdp"
    """Data-parallel flavour: replicated (DDP), fully sharded (FSDP2), or hybrid sharded (HSDP)."""
    dp_replicate: int = 1
    """Replicas (DDP, or the replicated dimension of HSDP)."""
    dp_shard: int = -1
    """Shards of parameters/gradients/optimizer state (FSDP2); -1 = whatever the world size leaves."""
    tp: int = 1
    """Tensor-parallel size (heads and MLP columns split across ranks)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    cp: int = 1
    """Context-parallel size (sequence split across ranks)."""
    cp_ring: int = 1
    """Of parallel.cp, the ranks that pass K/V around a ring (ring attention, framework/parallel/ring.py); the
    other factor, cp / cp_ring, exchanges heads (Ulysses) inside each ring rank's group. 1 = Ulysses only; cp =
    pure ring (no head-count limit: MQA works)."""
    cp_ulysses: int | None = None
    """Of parallel.cp, the Ulysses (head-exchange) group size; null = cp / cp_ring. cp_ulysses x cp_ring = cp."""
    cp_load_balance: bool = True
    """With cp_ring > 1: zigzag sharding (ring rank r holds sequence chunks r and 2 cp_ring - 1 - r of 2 cp_ring),
    so causal attention gives every ring rank the same work; false = contiguous chunks."""
    ep: int = 1
    """Expert-parallel size (MoE experts split across ranks)."""
    sequence_parallel: bool = False
    """With tp > 1: also shard the residual stream along the sequence inside each stack of blocks (norms, dropout
    and residual adds on S/tp tokens; attention and MLP all-gather their input and reduce-scatter their output).
    Needs data.seq_len divisible by tp. See framework/parallel/tensor.py."""
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining): gpipe (all forwards, then all backwards), 1f1b, and the
    two-stages-per-rank schedules interleaved_1f1b and zero_bubble (interleaved, with weight gradients deferred
    into the bubbles); rank r runs stages r and r + pp."""
    pp_microbatches: int | None = None
    """Micro-batches per pipeline step; null = number of stages."""
    pp_layers: list[int] | None = None
    """Blocks per pipeline stage (one entry per stage, summing to the model's blocks); null = split evenly."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: none, every block (full), or every other block (selective)."""
    compile: bool = False
    """torch.compile each block (inductor) on the run's device; on CPU that needs a C++ compiler and slows the
    first steps."""
    cpu_offload: bool = False
    """FSDP2/HSDP: keep the sharded parameters, gradients and optimizer step in CPU memory (CPUOffloadPolicy);
    each block's parameters are copied to the device just for its forward/backward. Saves device memory at the
    price of host-device copies and a CPU optimizer step. Needs data_parallel fsdp or hsdp with dp_shard > 1."""

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "cp", "ep"):
            _positive(self, "parallel", name)
        _require(
            self.dp_shard == -1 or self.dp_shard >= 1,
            "parallel.dp_shard",
            self.dp_shard,
            "must be -1 (auto) or >= 1",
            "use -1 to fill the world size",
        )
        _positive(self, "parallel", "pp_microbatches")
        _at_most(
            self, "parallel", MAX_RANKS, "dp_replicate", "dp_shard", "tp", "pp", "cp", "ep", "pp_microbatches"
        )
        _positive(self, "parallel", "cp_ring", "cp_ulysses")
        _require(
            self.cp % self.cp_ring == 0, "parallel.cp_ring", self.cp_ring,
            f"must divide parallel.cp={self.cp} (cp = cp_ulysses x cp_ring)", "pick a divisor of cp",
        )  # fmt: skip
        _require(
            self.cp_ulysses is None or self.cp_ulysses * self.cp_ring == self.cp, "parallel.cp_ulysses",
            self.cp_ulysses, f"times parallel.cp_ring={self.cp_ring} must equal parallel.cp={self.cp}",
            "set cp_ulysses to cp / cp_ring, or leave it null",
        )  # fmt: skip

    @property
    def resolved_cp_ulysses(self) -> int:
        """The Ulysses factor of cp: cp / cp_ring unless set."""
        return self.cp // self.cp_ring


@dataclass
class PrecisionConfig:
    """Numeric precision of compute and the fp16 loss scaler."""

    dtype: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    """Compute dtype: auto (bf16 on CUDA, fp32 elsewhere: a CPU has no bf16 matmul units, docs/benchmarks.md),
    fp32, bf16 autocast, fp16 autocast with dynamic loss scaling, or fp8: the transformer blocks' Linear matmuls
    in float8 (scaled per tensor or row, see fp8_backend), everything else in bf16 autocast. Master weights stay
    fp32. The run prints the dtype it chose."""
    tf32: bool = True
    """CUDA only: fp32 matmuls (an fp32 run's, and those autocast keeps in fp32) use TF32 tensor cores
    (torch.set_float32_matmul_precision('high'): 10-bit mantissa products, fp32 accumulation), about 8x an
    H100's fp32 rate. false keeps full fp32 matmuls."""
    fp8_backend: Literal["torchao", "te"] = "torchao"
    """fp8 only: torchao's float8 training (Float8Linear; the `fp8` extra; emulated on CPU) or Transformer
    Engine (te.Linear under TE's autocast; the `gpu` extra, CUDA only, not with parallel.tp > 1)."""
    fp8_recipe: Literal["tensorwise", "rowwise", "delayed", "current", "mxfp8"] | None = None
    """fp8 scaling recipe; null = tensorwise (torchao) or delayed (te). torchao: tensorwise (one dynamic scale
    per tensor) or rowwise (per row; more accurate, slower). te: delayed (amax history), current (this step's
    amax) or mxfp8 (32-element blocks; Blackwell only)."""
    fp8_skip_first_last: bool = True
    """fp8: keep the output head and the first and last transformer blocks' Linear layers in bf16 (the layers
    most sensitive to quantisation). Routers and layers whose sizes are not multiples of 16 always stay bf16."""
    loss_scale_init: float = 65536.0
    """fp16: initial loss scale."""
    loss_scale_growth_interval: int = 2000
    """fp16: steps without overflow before the scale grows by loss_scale_growth_factor."""
    loss_scale_growth_factor: float = 2.0
    """fp16: factor the scale grows by."""
    loss_scale_backoff_factor: float = 0.5
    """fp16: factor the scale shrinks by on overflow."""

    def validate(self) -> None:
        _positive(self, "precision", "loss_scale_init", "loss_scale_growth_interval")
        _at_most(self, "precision", MAX_STEPS, "loss_scale_growth_interval")
        _require(
            self.loss_scale_growth_factor > 1.0,
            "precision.loss_scale_growth_factor",
            self.loss_scale_growth_factor,
            "must be > 1",
            "use 2.0",
        )
        _require(
            0.0 < self.loss_scale_backoff_factor < 1.0,
            "precision.loss_scale_backoff_factor",
            self.loss_scale_backoff_factor,
            "must be in (0, 1)",
            "use 0.5",
        )
        if self.dtype == "fp8":
            self._validate_fp8()

    def _validate_fp8(self) -> None:
        # fp8 runs bf16 autocast around float8 matmuls scaled per tensor/row: there is no loss scaler to tune,
        # so a loss_scale_* setting would be silently ignored. (fp8_* fields are ignored unless dtype is fp8, so
        # an fp8 recipe can be compared with `--set precision.dtype=bf16`.)
        for f in fields(self):
            if f.name.startswith("loss_scale_") and getattr(self, f.name) != f.default:
                _require(
                    False, f"precision.{f.name}", getattr(self, f.name),
                    "fp16 loss scaling does not apply to dtype fp8 (bf16 around float8 matmuls, no loss scaler)",
                    f"remove precision.{f.name}, or use precision.dtype: fp16",
                )  # fmt: skip
        recipes = {"torchao": ("tensorwise", "rowwise"), "te": ("delayed", "current", "mxfp8")}
        allowed = recipes[self.fp8_backend]
        _require(
            self.fp8_recipe is None or self.fp8_recipe in allowed,
            "precision.fp8_recipe",
            self.fp8_recipe,
            f"fp8_backend {self.fp8_backend} has the recipes {', '.join(allowed)}",
            f"set precision.fp8_recipe: {allowed[0]} (or null)",
        )

    def resolved_dtype(self, device_type: str) -> str:
        """The concrete compute dtype on this device type: `auto` is bf16 on CUDA and fp32 elsewhere."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device_type == "cuda" else "fp32"

    @property
    def resolved_fp8_recipe(self) -> str:
        """The fp8 scaling recipe this run uses (fp8_recipe, or the backend's default)."""
        default = {"torchao": "tensorwise", "te": "delayed"}[self.fp8_backend]
        return self.fp8_recipe or default


@dataclass
class MuonConfig:
    """Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) for the hidden weight matrices when optim.name is
    muon. Its learning rate and weight decay are optim.lr and optim.weight_decay; the AdamW fields above drive the
    other parameters. See docs/optimizers.md."""

    momentum: float = 0.95
    """Momentum (an exponential average of the gradients: buf = momentum*buf + (1 - momentum)*grad)."""
    nesterov: bool = True
    """Orthogonalise grad + momentum*(buf - grad) (Nesterov) instead of the momentum buffer itself."""
    ns_steps: int = 5
    """Newton-Schulz iterations (the quintic of Jordan et al., coefficients 3.4445, -4.7750, 2.0315)."""
    ns_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Dtype of the Newton-Schulz iteration; auto: bfloat16 on CUDA, float32 on CPU."""
    lr_scale: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """match_rms_adamw: update x 0.2*sqrt(max(rows, cols)) so its RMS matches AdamW's and AdamW's lr and weight
    decay carry over (Moonlight); original: x sqrt(max(1, rows/cols)) (Jordan et al.)."""
    include: list[str] = field(default_factory=list)
    """Globs of parameter names (fnmatch) also given to Muon (2-D or more), beside the default rule: the weights
    of linear layers and expert stacks, except the embeddings and the output head."""
    exclude: list[str] = field(default_factory=list)
    """Globs of parameter names given to AdamW instead of Muon (e.g. '*.router.gate.weight' for the MoE routers)."""

    def validate(self) -> None:
        _require(
            0.0 <= self.momentum < 1.0, "optim.muon.momentum", self.momentum, "must be in [0, 1)", "use 0.95"
        )
        _require(1 <= self.ns_steps <= 20, "optim.muon.ns_steps", self.ns_steps, "must be 1..20", "use 5")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for hidden matrices with AdamW for the rest), decoupled weight decay and
    gradient clipping."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW for every parameter (fused kernels on CUDA); muon: Muon for the hidden weight matrices (rules in
    optim.muon, listed by `loom check`), AdamW for embeddings, the output head, norms, biases and 1-D parameters."""
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay applied to weight matrices."""
    decay_embeddings: bool = False
    """Also decay embeddings (norm gains and biases are never decayed)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool | None = None
    """Fused AdamW kernel; null = on for CUDA, off elsewhere."""
    muon: MuonConfig = field(default_factory=MuonConfig)
    """Muon's settings (used when name is muon)."""
    qk_clip: float = 0.0
    """QK-clip tau (Kimi K2's MuonClip; e.g. 100): after each step, the query and key weights of every attention
    head whose max logit on the step exceeded tau are scaled so it would be tau; 0 = off. docs/optimizers.md."""

    def validate(self) -> None:
        self.muon.validate()
        _positive(self, "optim", "lr", "eps")
        _non_negative(self, "optim", "qk_clip")
        _non_negative(self, "optim", "weight_decay", "grad_clip")
        for i, beta in enumerate(self.betas):
            _require(
                0.0 <= beta < 1.0, f"optim.betas[{i}]", beta, "must be in [0, 1)", "use e.g. [0.9, 0.95]"
            )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, as a multiplier of optim.lr per optimizer step."""

    name: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup-stable-decay (linear decay at the end); constant: warmup then flat."""
    warmup_steps: int = 100
    """Linear warmup from 0 over this many steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd: fraction of train.steps spent in the final decay."""

    def validate(self) -> None:
        _non_negative(self, "schedule", "warmup_steps")
        _at_most(self, "schedule", MAX_STEPS, "warmup_steps")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0,
            "schedule.min_lr_ratio",
            self.min_lr_ratio,
            "must be in [0, 1]",
            "use e.g. 0.1",
        )
        _require(
            0.0 < self.decay_fraction <= 1.0,
            "schedule.decay_fraction",
            self.decay_fraction,
            "must be in (0, 1]",
            "use e.g. 0.2",
        )


@dataclass
class DataConfig:
    """Where tokens come from and which training objective turns them into inputs and labels."""

    tokenizer: str = "data/demo/tokenizer.model"
    """Path of the sentencepiece model (relative paths are from the working directory)."""
    train: str | list[str] = "data/demo"
    """Training data: a folder prepared by `loom data prepare` (its train split), or a list of them (a mixture)."""
    validation: str | None = "data/demo"
    """A prepared folder whose validation split gives the validation loss; null disables validation."""
    weights: list[float] | None = None
    """Mixture weights, one per data.train folder; null = proportional to their sample counts."""
    verify: Literal["size", "sha256"] = "sha256"
    """Shard check at start: sizes only (fast for huge data), or sizes and sha256 against the manifest. Either way
    the index is checked at start and every sample's token ids on read (docs/data.md, Verification)."""
    num_workers: int = 0
    """DataLoader worker processes reading training batches; 0 = in the training process. Batches are the same."""
    seq_len: int = 256
    """Tokens per training sequence (the encoder's length for span corruption); must divide the prepared one."""
    objective: Literal["causal", "prefix", "mlm", "span_corruption"] = "causal"
    """causal LM; prefix LM (bidirectional prefix, loss on the rest); masked LM (BERT); T5 span corruption."""
    document_masking: bool = False
    """Packed sequences: no attention across document boundaries and positions restart per document."""
    mlm_probability: float = 0.15
    """mlm: fraction of tokens selected for prediction (80% masked, 10% random, 10% kept)."""
    noise_density: float = 0.15
    """span_corruption: fraction of tokens corrupted."""
    mean_span_length: float = 3.0
    """span_corruption: mean length of a corrupted span."""
    seed: int = 1234
    """Seed of the sample order and of the objective's randomness."""
    skip_samples: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) ranges of global sample positions the training stream steps over: a step that would start
    inside one starts at its end (the ranges a loss-spike rewind skipped are in runs/*/skipped_data.jsonl and the
    checkpoints; listing them here replays a run without that data)."""

    def validate(self) -> None:
        for i, (start, end) in enumerate(self.skip_samples):
            _require(
                0 <= start < end, f"data.skip_samples[{i}]", [start, end], "must be [start, end) with 0 <= start < end",
                "write the range as [first skipped sample, first kept sample]",
            )  # fmt: skip
        _positive(self, "data", "seq_len", "mean_span_length")
        _non_negative(self, "data", "num_workers")
        _at_most(self, "data", MAX_TOKENS, "seq_len")
        _at_most(self, "data", 1024, "num_workers")
        for name in ("mlm_probability", "noise_density"):
            value = getattr(self, name)
            _require(0.0 < value < 1.0, f"data.{name}", value, "must be in (0, 1)", "use e.g. 0.15")


@dataclass
class BatchRampConfig:
    """Batch-size ramp-up (GPT-3, Brown et al. 2020; Megatron-LM's --rampup-batch-size): the global batch grows from
    `start` sequences to train.global_batch_size in steps of `increment`, evenly over the first `over_tokens`
    tokens of the data order. It changes how many accumulation micro-batches a step has; the sample order is
    unchanged, and the size is a function of the data position only, so a resume mid-ramp (on any layout) is exact."""

    start: int = 32
    """Sequences per step at the beginning (a multiple of train.micro_batch_size x data-parallel ranks)."""
    increment: int = 32
    """Sequences added per increase (a multiple of train.micro_batch_size x data-parallel ranks)."""
    over_tokens: int = 1_000_000_000
    """Tokens (data positions x data.seq_len) over which the batch reaches train.global_batch_size."""

    def validate(self, global_batch_size: int, micro_batch_size: int) -> None:
        _positive(self, "train.batch_ramp", "start", "increment", "over_tokens")
        _require(
            self.start < global_batch_size and (global_batch_size - self.start) % self.increment == 0,
            "train.batch_ramp.start", self.start,
            f"must be below train.global_batch_size={global_batch_size} by a multiple of increment={self.increment}",
            "e.g. start: global_batch_size / 8 and increment: start",
        )  # fmt: skip
        for name in ("start", "increment"):
            value = getattr(self, name)
            _require(
                value % micro_batch_size == 0, f"train.batch_ramp.{name}", value,
                f"must be a multiple of train.micro_batch_size={micro_batch_size}", "round it to one",
            )  # fmt: skip

    def size_at(self, global_batch_size: int, seq_len: int, position: int) -> int:
        """The global batch of the step that starts at data position `position` (samples)."""
        increases = (global_batch_size - self.start) // self.increment
        done = min(1.0, position * seq_len / self.over_tokens)
        return self.start + self.increment * min(increases, math.floor(done * increases))


@dataclass
class TrainConfig:
    """The training loop: batch, length, loss extras, evaluation and stability policy."""

    steps: int = 100
    """Optimizer steps to train."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and accumulation micro-steps."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation steps = global / (micro x data-parallel ranks)."""
    seed: int = 0
    """Seed of parameter init (by parameter name) and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    z_loss: float = 0.0
    """Output z-loss coefficient: adds z_loss * mean(logsumexp(logits)^2) (PaLM) to keep logits bounded."""
    eval_every: int = 50
    """Run validation every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Micro-batches of held-out data per validation."""
    skip_nonfinite: bool = True
    """Skip a step (no update, counted) when the loss or a gradient is NaN/inf."""
    spike_sigma: float = 0.0
    """Loss-spike detection: a loss more than this many standard deviations above the recent mean; 0 disables."""
    spike_window: int = 50
    """Steps of recent losses used for the spike mean and deviation."""
    spike_policy: Literal["skip", "halt", "rewind"] = "skip"
    """On a spike: skip the update; stop with a diagnostics file; or rewind: restore the last good checkpoint (in the
    same processes), step over the samples consumed since it (plus spike_skip_samples) and go on (docs/stability)."""
    spike_grad_norm: bool = False
    """Also call a spike when the gradient norm exceeds mean + spike_sigma std of its own window."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms, cuDNN autotuning off, cuBLAS's fixed
    workspace, TE's deterministic attention backward): two runs on the same layout and GPUs repeat bit for bit as far
    as those kernels allow; slower. docs/stability.md lists what it costs and what stays nondeterministic."""
    batch_ramp: BatchRampConfig | None = None
    """Grow the global batch over the first tokens (see BatchRampConfig); null = train.global_batch_size throughout."""
    max_rewinds: int = 5
    """rewind: halt (with the diagnostics file of spike_policy halt) at the spike after this many rewinds in one
    run, the data was not what went wrong."""
    spike_skip_samples: int = 0
    """rewind: samples skipped beyond the spiking step's (the margin after the bad data)."""
    max_consecutive_skips: int = 20
    """Halt after this many consecutive skipped steps."""

    def validate(self) -> None:
        _positive(
            self, "train", "steps", "global_batch_size", "micro_batch_size", "eval_batches", "spike_window"
        )
        _positive(self, "train", "max_consecutive_skips", "max_rewinds")
        _non_negative(self, "train", "z_loss", "eval_every", "spike_sigma", "spike_skip_samples")
        if self.batch_ramp is not None:
            self.batch_ramp.validate(self.global_batch_size, self.micro_batch_size)
        _at_most(self, "train", MAX_STEPS, "steps", "eval_every", "max_consecutive_skips")
        _at_most(
            self, "train", MAX_BATCH, "global_batch_size", "micro_batch_size", "eval_batches", "spike_window"
        )
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            self.global_batch_size,
            f"must be a multiple of train.micro_batch_size={self.micro_batch_size}",
            f"use a multiple of {self.micro_batch_size}",
        )


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written (each one a directory committed atomically)."""

    dir: str | None = None
    """Checkpoint directory; null = <logging.run_dir>/checkpoints."""
    every: int = 0
    """Save every this many steps; 0 = only at the end."""
    save_final: bool = True
    """Save after the last step."""
    keep_last: int = 3
    """Keep this many newest checkpoints; older ones are deleted after a new one is committed."""
    keep_every: int = 0
    """Also keep, for good, every checkpoint whose step is a multiple of this (0 = none)."""
    async_save: bool = False
    """Write checkpoints in a background thread while training continues (the step pays only a copy of this
    rank's state); the next save waits for the previous one. false = training waits until the save is committed."""

    def validate(self) -> None:
        _non_negative(self, "checkpoint", "every", "keep_every")
        _positive(self, "checkpoint", "keep_last")
        _at_most(self, "checkpoint", MAX_STEPS, "every", "keep_every", "keep_last")


_WANDB_PROJECT_FORBIDDEN = set("/\\#?%:")
"""Characters W&B refuses in a project name (it names a URL path)."""


@dataclass
class WandbConfig:
    """Weights & Biases (`logging.wandb`; needs `pip install loom-pretrain[wandb]`). Rank 0 logs the records of
    metrics.jsonl (train and val under train/..., val/..., the end-of-run summary under summary/...) to one W&B
    run, with the resolved recipe as its config; a resumed run continues the same W&B run (its id is saved in
    the checkpoint). Credentials, entity and the server come from W&B's own settings (`wandb login`,
    WANDB_API_KEY, WANDB_ENTITY, WANDB_BASE_URL)."""

    mode: Literal["disabled", "online", "offline"] = "disabled"
    """disabled: no W&B; online: stream to the W&B server; offline: write the run under `dir` only (upload it
    later with `wandb sync <dir>/wandb/offline-run-...`)."""
    project: str | None = None
    """W&B project; null = W&B's default (WANDB_PROJECT, else "uncategorized")."""
    name: str | None = None
    """Display name of the W&B run; null = the name of logging.run_dir."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (each 1-64 characters, no repeats)."""
    dir: str | None = None
    """Folder W&B writes its files under (<dir>/wandb/); null = logging.run_dir."""

    def validate(self) -> None:
        p = "logging.wandb"
        if self.project is not None:
            bad = sorted(_WANDB_PROJECT_FORBIDDEN & set(self.project))
            _require(
                0 < len(self.project) <= 128 and not bad, f"{p}.project", self.project,
                "must be 1-128 characters without / \\ # ? % :", "use a name like my-project",
            )  # fmt: skip
        for key in ("name", "dir"):
            value = getattr(self, key)
            _require(
                value is None or value.strip() != "", f"{p}.{key}", value, "must not be empty", "use null"
            )
        for i, tag in enumerate(self.tags):
            _require(0 < len(tag) <= 64, f"{p}.tags[{i}]", tag, "must be 1-64 characters", "shorten the tag")
        repeated = sorted({t for t in self.tags if self.tags.count(t) > 1})
        _require(not repeated, f"{p}.tags", repeated, "names a tag twice", "keep each tag once")


@dataclass
class LoggingConfig:
    """Where the run writes and what it reports."""

    run_dir: str = "runs/default"
    """Directory of this run's logs (metrics.jsonl, TensorBoard) and default checkpoint location."""
    log_every: int = 1
    """Write metrics every this many steps."""
    progress_bar: bool = True
    """Show progress on stderr (rank 0 only): a bar with ETA on a terminal; elsewhere (Slurm logs, pipes) one
    plain line per logged step (step/total, loss, lr, tokens/s, elapsed, ETA)."""
    jsonl: bool = True
    """Write metrics to <run_dir>/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run_dir>/tb."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; null = look up the device in the built-in table."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (off by default); see WandbConfig."""
    profile_step: int | None = None
    """Record a torch profiler trace of this one step (CPU and CUDA activity, rank 0): <run_dir>/profile/
    step_N.trace.json (Chrome trace: chrome://tracing or ui.perfetto.dev) and step_N.top_kernels.json (the 15
    ops / kernels with the most device time, else CPU time). null: no profiling. The step before it warms the
    profiler up, so it must be >= 2."""

    def validate(self) -> None:
        _positive(self, "logging", "log_every", "peak_tflops")
        _at_most(self, "logging", MAX_STEPS, "log_every")
        _require(
            self.profile_step is None or self.profile_step >= 2,
            "logging.profile_step",
            self.profile_step,
            "must be >= 2 (the step before it warms the profiler up)",
            "set logging.profile_step: 2 or later, or null",
        )
        self.wandb.validate()


# Values that reach a Slurm job script: names and times are whole-matched against these (no quotes, spaces,
# `$`, `;` or newlines can pass), everything else is shell-quoted when the script is rendered.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d\d))?(?::(\d\d))?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def slurm_time_seconds(value: str) -> int | None:
    """Seconds of a Slurm time limit ('MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS'); None if malformed."""
    match = _SLURM_TIME.fullmatch(value)
    if match is None:
        return None
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    if third is not None:  # HH:MM:SS
        return (first * 60 + second) * 60 + third
    return first * 60 + (second or 0)  # MM[:SS]


@dataclass
class LaunchConfig:
    """How many processes and nodes run the job (local launcher and Slurm). `loom submit` renders these into an
    sbatch script (see docs/slurm.md); its --nodes/--gpus-per-node/--partition/--time/--account flags override
    them."""

    nproc_per_node: int = 1
    """Worker processes per node (one per GPU; with gpus_per_node > 0 they must be equal)."""
    nnodes: int = 1
    """Number of nodes the job spans."""
    partition: str | None = None
    """Slurm partition (or a comma-separated list of them); null = the cluster's default."""
    account: str | None = None
    """Slurm account charged for the job; null = the user's default."""
    qos: str | None = None
    """Slurm quality of service; null = the default."""
    time: str | int = "01:00:00"
    """Slurm time limit (MM, MM:SS, HH:MM:SS or D-HH:MM:SS). Unquoted, YAML 1.1 reads 3:00 or 1:30:00 as a number
    of seconds (base 60: 180, 5400); such a number is read back as that duration (180 -> "3:00"), so it means
    what Slurm reads in the text. A bare number is therefore seconds: for minutes, quote it ("30")."""
    gpus_per_node: int = 0
    """GPUs requested per node (Slurm); 0 = a CPU job."""
    cpus_per_node: int | None = None
    """CPUs per node for its launcher and workers (Slurm --cpus-per-task); null = whole nodes (--exclusive)."""
    job_name: str | None = None
    """Slurm job name; null = the recipe file's name without .yaml."""
    signal_seconds: int = 120
    """Slurm sends SIGUSR1 this many seconds before the time limit (--signal=USR1@N): the run saves a checkpoint,
    exits with status 75 and the job requeues itself to resume. 0 = no warning signal."""
    env: list[str] = field(default_factory=list)
    """Extra environment of the job, as NAME=VALUE items (e.g. NCCL_SOCKET_IFNAME=ib0)."""
    gpu: str | None = None
    """The GPU model the recipe is laid out for, a name from framework/gpus.py (e.g. H100-80GB, A100-40GB): with
    it `loom check` compares the memory per rank on nnodes x nproc_per_node ranks with that GPU's memory. A
    statement about the cluster, not a request: it is not passed to Slurm (GPU type names are site-specific;
    choose the nodes with launch.partition). null = none named."""

    def validate(self) -> None:
        _positive(self, "launch", "nproc_per_node", "nnodes", "cpus_per_node")
        _non_negative(self, "launch", "gpus_per_node", "signal_seconds")
        _require(
            self.gpu is None or self.gpu in GPU_NAMES,
            "launch.gpu",
            self.gpu,
            "is not a GPU model Loom knows (framework/gpus.py)",
            f"use one of {', '.join(GPU_NAMES)}, or null",
        )
        for name in ("partition", "account", "qos", "job_name"):
            value = getattr(self, name)
            parts = [] if value is None else value.split(",") if name == "partition" else [value]
            _require(
                all(_SLURM_NAME.fullmatch(p) for p in parts),
                f"launch.{name}",
                value,
                "must be a Slurm name: letters, digits and _ . + - only",
                "use the name `sinfo`/`sacctmgr` shows",
            )
        self._validate_time()
        for i, item in enumerate(self.env):
            name, sep, value = item.partition("=")
            _require(
                bool(sep) and bool(_ENV_NAME.fullmatch(name)) and value.isprintable(),
                f"launch.env[{i}]",
                item,
                "must be NAME=VALUE with a shell variable name and no control characters",
                "e.g. NCCL_SOCKET_IFNAME=ib0",
            )

    def _validate_time(self) -> None:
        # Recipes are read without YAML 1.1's base-60 numbers (framework/config/loader.py), so an unquoted
        # 3:00 arrives as the text "3:00"; a bare number is what Slurm reads from the same text: minutes.
        if isinstance(self.time, int):  # the loader refuses a bool
            self.time = str(self.time)
        seconds = slurm_time_seconds(self.time)
        fix = "e.g. 30 (minutes), 3:00 (3 minutes), 04:00:00 or 2-00:00:00"
        _require(seconds is not None, "launch.time", self.time, "is not a Slurm time limit", fix)
        _require(
            seconds is not None and seconds > self.signal_seconds,
            "launch.time",
            self.time,
            f"must be longer than launch.signal_seconds={self.signal_seconds} (the save-and-requeue warning)",
            "raise launch.time or lower launch.signal_seconds",
        )


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (parallel.engine: deepspeed). Its JSON config is generated from the whole recipe
    (batch sizes, clipping, precision) plus these fields; see docs/deepspeed.md."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 plain data parallel, 1 optimizer state partitioned over ranks, 2 also gradients, 3 also
    parameters (gathered per layer for forward and backward)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep the optimizer state and run its step in CPU memory (ZeRO stage >= 1)."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep the partitioned parameters in CPU memory between uses (ZeRO stage 3)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Further DeepSpeed config keys, merged over the generated config (nested mappings key by key), e.g.
    {zero_optimization: {reduce_bucket_size: 5.0e7}}; checked against DeepSpeed's own config models, so a
    misspelt key is an error."""

    def validate(self) -> None:
        _require(
            self.offload_optimizer == "none" or self.zero_stage >= 1,
            "deepspeed.offload_optimizer", self.offload_optimizer, "needs deepspeed.zero_stage >= 1",
            "set deepspeed.zero_stage: 1, 2 or 3",
        )  # fmt: skip
        _require(
            self.offload_params == "none" or self.zero_stage == 3,
            "deepspeed.offload_params", self.offload_params, "needs deepspeed.zero_stage: 3 (partitioned parameters)",
            "set deepspeed.zero_stage: 3, or offload_params: none",
        )  # fmt: skip


SECTIONS = (
    "model",
    "parallel",
    "precision",
    "optim",
    "schedule",
    "data",
    "train",
    "checkpoint",
    "logging",
    "launch",
    "deepspeed",
)


@dataclass
class Recipe:
    """A whole training recipe: one field per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logs and metrics."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Processes and nodes."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed engine's settings (used with parallel.engine: deepspeed)."""

    def checkpoint_root(self) -> Path:
        """Where the run's checkpoints go: checkpoint.dir, or <logging.run_dir>/checkpoints."""
        return (
            Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.logging.run_dir) / "checkpoints"
        )

    def validate(self) -> None:
        for name in SECTIONS:
            getattr(self, name).validate()
        self._validate_cross_section()

    def _validate_cross_section(self) -> None:
        m, d = self.model, self.data
        allowed = {
            "decoder": ("causal", "prefix"),
            "encoder": ("mlm",),
            "encoder_decoder": ("span_corruption",),
        }[m.family]
        _require(
            d.objective in allowed,
            "data.objective",
            d.objective,
            f"model.family={m.family} trains with {' or '.join(allowed)}",
            f"set data.objective: {allowed[0]}",
        )
        _require(
            d.seq_len <= m.max_seq_len,
            "data.seq_len",
            d.seq_len,
            f"longer than model.max_seq_len={m.max_seq_len}",
            f"raise model.max_seq_len to at least {d.seq_len} or shorten data.seq_len",
        )
        if m.mtp is not None:
            self._validate_mtp_parallel()
        if self.optim.qk_clip > 0:
            self._validate_qk_clip()
        t = self.train
        _require(
            t.spike_policy != "rewind" or (self.checkpoint.every > 0 and t.spike_sigma > 0), "train.spike_policy",
            "rewind", "goes back to the last checkpoint: needs checkpoint.every > 0 and train.spike_sigma > 0",
            "set checkpoint.every (e.g. 500) and train.spike_sigma (e.g. 6), or spike_policy: skip",
        )  # fmt: skip

    def _validate_qk_clip(self) -> None:
        """optim.qk_clip where rescaling W_q/W_k reaches the logits and the probe sees them whole."""
        m, p, key, tau = self.model, self.parallel, "optim.qk_clip", self.optim.qk_clip
        _require(
            not m.qk_norm, key, tau, "has no effect with model.qk_norm: the norm undoes a scaled W_q or W_k "
            "(QK-clip is the alternative to QK-norm, e.g. for MLA)", "set optim.qk_clip: 0, or model.qk_norm: false",
        )  # fmt: skip
        _require(
            m.family == "decoder", key, tau, "clips decoder self-attention only (Kimi K2's setting)",
            "set optim.qk_clip: 0 for encoders and encoder-decoders",
        )  # fmt: skip
        _require(
            p.cp == 1 and p.engine == "native", key, tau, "needs each rank's attention to see whole sequences "
            "and the native engine (context parallelism and DeepSpeed are not covered yet)",
            "set parallel.cp: 1 and parallel.engine: native, or optim.qk_clip: 0",
        )  # fmt: skip

    def _validate_mtp_parallel(self) -> None:
        """model.mtp under the layouts it does not support yet (framework/models/mtp.py)."""
        p, key = self.parallel, "model.mtp"
        _require(
            p.engine == "native", key, "set", "is trained by the native engine only (parallel.engine)",
            "set parallel.engine: native, or remove model.mtp",
        )  # fmt: skip
        _require(
            p.cp == 1, key, "set", "needs whole sequences: its shifted tokens cross context-parallel shards",
            "set parallel.cp: 1, or remove model.mtp",
        )  # fmt: skip
        _require(
            p.tp == 1 or not self.model.tie_embeddings, key, "set",
            "with a tied head is not laid out over tensor parallelism yet",
            "set model.tie_embeddings: false, or parallel.tp: 1",
        )  # fmt: skip
