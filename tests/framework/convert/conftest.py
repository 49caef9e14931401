"""Tiny, deliberately non-square models of every convertible family."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from framework.config.schema import LayersConfig, ModelConfig, MoEConfig
from framework.models.moe import Router, Routing
from framework.run import materialize_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 101  # not a multiple of 64
SEQ = 16

_DECODER = dict(family="decoder", vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, kv_heads=2, head_dim=12,
                ffn_hidden=72, max_seq_len=64, norm_eps=1e-6)  # fmt: skip
_GEMMA = _DECODER | dict(mlp="geglu", gelu_approximate="tanh", norm_weight_offset=True,
                         embedding_scale="sqrt_d_model")  # fmt: skip
_GEMMA2 = _GEMMA | dict(sandwich_norm=True, final_logit_softcap=4.0, attention_softcap=1.5,
                        softmax_scale=20**-0.5)  # fmt: skip
CONFIGS: dict[str, ModelConfig] = {
    "llama": ModelConfig(**_DECODER, bias=True),
    "llama_tied": ModelConfig(**_DECODER, tie_embeddings=True, rope_theta=500.0),
    "mistral": ModelConfig(**_DECODER, sliding_window=5),  # SEQ and the 20 generated tokens exceed it
    "qwen3": ModelConfig(**_DECODER, qk_norm=True, tie_embeddings=True),
    # OLMo 2: x + norm(f(x)) blocks, QK-norm over the whole q / k projections (GQA: k's is narrower), odd theta
    "olmo2": ModelConfig(
        **_DECODER | {"kv_heads": 2, "norm_eps": 2e-6},
        norm_position="reordered",
        qk_norm=True,
        qk_norm_scope="projection",
        rope_theta=4000.0,
    ),
    # OLMo 3: OLMo 2 with a window on every layer but one (layer_types); the 20 generated tokens exceed it
    "olmo3": ModelConfig(
        **_DECODER | {"n_layers": 3},
        norm_position="reordered",
        qk_norm=True,
        qk_norm_scope="projection",
        sliding_window=5,
        full_attention_layers=[2],
    ),
    # q/k/v biases only; 5 query heads over one kv head (multi-query), odd eps and theta
    "qwen2": ModelConfig(
        **_DECODER | {"n_heads": 5, "kv_heads": 1, "norm_eps": 3e-5},
        bias=True,
        bias_scope="qkv",
        rope_theta=7000.0,
    ),
    # every layer windowed (max_window_layers 0), a tied head
    "qwen2_window_tied": ModelConfig(
        **_DECODER, bias=True, bias_scope="qkv", sliding_window=5, tie_embeddings=True
    ),
    # fused qkv_proj / gate_up_proj; 6 heads over 3 kv heads, a uniform window shorter than the sequence
    "phi3": ModelConfig(
        **_DECODER | {"kv_heads": 3, "norm_eps": 1e-5},
        sliding_window=7,
        rope_theta=2500.0,
        hf_architecture="phi3",
    ),
    # Conv1D weights, learned positions, tied head, GELU tanh ("gelu_new"); 3 heads of 16, an MLP not 4x wide
    "gpt2": ModelConfig(
        family="decoder",
        vocab_size=VOCAB,
        d_model=48,
        n_layers=3,
        n_heads=3,
        ffn_hidden=80,
        mlp="gelu",
        gelu_approximate="tanh",
        norm="layernorm",
        norm_eps=2e-5,
        bias=True,
        position="learned",
        max_seq_len=64,
        tie_embeddings=True,
    ),
    # an untied lm_head and exact erf GELU ("gelu"); 5 heads of 8
    "gpt2_untied_erf": ModelConfig(
        family="decoder",
        vocab_size=VOCAB,
        d_model=40,
        n_layers=2,
        n_heads=5,
        ffn_hidden=56,
        mlp="gelu",
        norm="layernorm",
        norm_eps=1e-5,
        bias=True,
        position="learned",
        max_seq_len=48,
    ),
    # every layer sparse, a window shorter than the sequence; Mixtral's files give one width to both fields
    "mixtral": ModelConfig(
        **_DECODER | {"ffn_hidden": 40},
        sliding_window=5,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=40, aux_loss=0.02, jitter=0.1),
    ),
    # a dense first layer (mlp_only_layers), narrow experts, raw top-k probabilities (norm_topk_prob false)
    "qwen3_moe": ModelConfig(
        **_DECODER | {"n_layers": 3},
        qk_norm=True,
        tie_embeddings=True,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=20, first_dense=1, renormalize=False),
    ),
    # sparse layers 0 and 2 around a dense one, renormalised top-3 of 5
    "qwen3_moe_every2": ModelConfig(
        **_DECODER | {"n_layers": 3},
        qk_norm=True,
        moe=MoEConfig(n_experts=5, top_k=3, expert_hidden=16, every=2),
    ),
    "gemma": ModelConfig(**_GEMMA, tie_embeddings=True),
    # Gemma 2: sandwich norms, caps that bind (tanh far from linear), query_pre_attn_scalar 20 != head_dim 12;
    # the windowed one has every layer sliding (Loom's uniform window), untied
    "gemma2": ModelConfig(**_GEMMA2, tie_embeddings=True),
    "gemma2_window_untied": ModelConfig(**_GEMMA2 | {"n_layers": 3}, sliding_window=5),
    # transformers' default layer_types: sliding, full, sliding (a window the sequence exceeds)
    "gemma2_alternating": ModelConfig(
        **_GEMMA2 | {"n_layers": 3}, sliding_window=5, full_attention_layers=[1]
    ),
    # Gemma 3: QK-norm, local layers 0 and 1 (window 5 the sequence exceeds, their own RoPE base) around a global
    # one with linear-scaled RoPE; no caps, query_pre_attn_scalar 20 != head_dim 12
    "gemma3": ModelConfig(
        **_GEMMA2 | {"n_layers": 3, "final_logit_softcap": None, "attention_softcap": None},
        qk_norm=True,
        rope_theta=1e6,
        rope_scaling="linear",
        rope_scaling_factor=2.0,
        layers=LayersConfig(
            pattern=["attention_local", "attention_local", "attention"], local_window=5, local_rope_theta=1e4
        ),
        tie_embeddings=True,
    ),
    "t5": ModelConfig(
        family="encoder_decoder",
        vocab_size=VOCAB,
        d_model=40,
        n_layers=2,
        n_decoder_layers=3,
        n_heads=6,
        head_dim=12,
        ffn_hidden=56,
        mlp="geglu",
        gelu_approximate="tanh",
        norm_eps=1e-6,
        position="relative_bias",
        relative_buckets=8,
        relative_max_distance=20,
        softmax_scale="none",
        max_seq_len=64,
    ),  # fmt: skip
    # T5 v1.0 style: ReLU MLP, tied head (transformers must then not rescale the decoder output)
    "t5_relu_tied": ModelConfig(
        family="encoder_decoder",
        vocab_size=VOCAB,
        d_model=40,
        n_layers=2,
        n_heads=4,
        head_dim=8,
        ffn_hidden=56,
        mlp="relu",
        norm_eps=1e-6,
        position="relative_bias",
        relative_buckets=8,
        relative_max_distance=20,
        softmax_scale="none",
        max_seq_len=64,
        tie_embeddings=True,
    ),  # fmt: skip
    "bert": ModelConfig(
        family="encoder",
        vocab_size=VOCAB,
        d_model=48,
        n_layers=2,
        n_heads=6,
        ffn_hidden=72,
        mlp="gelu",
        norm="layernorm",
        norm_eps=1e-12,
        norm_position="post",
        bias=True,
        position="learned",
        max_seq_len=64,
        type_vocab_size=2,
        embedding_norm=True,
        mlm_head_transform=True,
        output_bias=True,
        tie_embeddings=True,
    ),  # fmt: skip
    "bloom": ModelConfig(
        family="decoder",
        vocab_size=VOCAB,
        d_model=48,
        n_layers=2,
        n_heads=6,
        ffn_hidden=192,
        mlp="gelu",
        gelu_approximate="tanh",
        norm="layernorm",
        bias=True,
        position="alibi",
        embedding_norm=True,
        max_seq_len=64,
        tie_embeddings=True,
    ),  # fmt: skip
}


def random_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Loom's init, then every tensor perturbed, so norm gains and biases are not 1 and 0 (a swapped or
    dropped norm/bias would otherwise go unnoticed)."""
    model = materialize_model(cfg, torch.device("cpu"), seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@contextmanager
def routing_margins(model: nn.Module) -> Iterator[list[float]]:
    """Collects, per router call, the smallest gap between a token's k-th and (k+1)-th softmax score. Two
    implementations route identically only if their ~1e-6 numeric differences cannot swap an expert in or out,
    so the comparisons assert this gap is well above that."""
    margins: list[float] = []

    def record(router: nn.Module, _: tuple[torch.Tensor, ...], routing: Routing) -> None:
        k, scores = router.moe.top_k, routing.logits.softmax(dim=-1)
        if k < scores.shape[-1]:
            top = scores.topk(k + 1, dim=-1).values
            margins.append((top[:, k - 1] - top[:, k]).min().item())

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Router)]
    try:
        yield margins
    finally:
        for handle in handles:
            handle.remove()
