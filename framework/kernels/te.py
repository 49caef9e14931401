"""NVIDIA Transformer Engine (TE) adapters — the only Loom file that imports `transformer_engine`.

Every TE import happens inside a function, so a machine without TE (every CPU machine; TE needs CUDA and cuDNN)
imports all of Loom. The pinned version is TE_VERSION (the `gpu` extra in pyproject.toml); the contract test
tests/framework/kernels/test_te_contract.py checks, without importing TE, that every TE class, function and
keyword used below exists with that name in that version's sources.

What each call maps to (TE 2.20 API docs, https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/api/pytorch.html):

- `TEAttention` -> `transformer_engine.pytorch.DotProductAttention`, installed on Loom's `Attention.kernel` seam
  (framework/models/attention.py) by `install_te_attention`. Loom's q/k/v [B, heads, S, D] become
  `qkv_format="bshd"`; `num_attention_heads` / `num_gqa_groups` are the local query / key-value heads (GQA, MQA),
  `kv_channels` the head width, `softmax_scale` Loom's scale, `attention_dropout` the layer's dropout.
  Masks (loom `AttentionMask` -> TE):
    full                 -> attn_mask_type "no_mask"
    causal               -> "causal"  (top-left diagonal; Loom's self-attention has S_q = S_k)
    sliding window w     -> window_size (w - 1, 0): TE lets query i see keys [i - left, i + right] inclusive,
                            Loom lets it see keys with i - j < w
    document ids         -> qkv_format "thd" with cu_seqlens_q = cu_seqlens_kv = the starts of the runs of equal
                            ids (each batch row starts a run) and attn_mask_type "padding" / "padding_causal";
                            the window, if any, applies inside each document as in Loom.
  A learned or fixed attention temperature scales q (as sdpa_attention does). Context parallelism: Loom's
  Ulysses hook (framework/parallel/context.py) wraps this kernel unchanged. With ring attention
  (parallel.cp_ring > 1, no Ulysses factor) TE runs its own ring instead of Loom's: `with_ring` gives the kernel
  `cp_group` = the ring's group, `cp_global_ranks` its ranks, `cp_comm_type` "p2p" and a side `cp_stream`, and
  TE gets this rank's shard as it is: Loom's zigzag shard (chunks r and 2 cp - 1 - r of 2 cp,
  framework/parallel/ring.py token_order) is TE's dual-chunk-swap layout for causal p2p CP. Hierarchical
  "a2a+p2p", documents and windows under TE's CP are refused by framework/kernels/choice.py.
- `swap_linears` -> `transformer_engine.pytorch.Linear` for every `nn.Linear` of the transformer blocks (same
  `weight` / `bias` names and values), so `fp8_context` has TE modules to run in FP8. TE adds an `_extra_state`
  entry per module to the state dict.
- `fp8_context(name)` -> `transformer_engine.pytorch.autocast(enabled=True, recipe=...)` with
  `transformer_engine.common.recipe.DelayedScaling` ("delayed"), `Float8CurrentScaling` ("current") or
  `MXFP8BlockScaling` ("mxfp8", Blackwell only). (`fp8_autocast` is deprecated in 2.20 in favour of `autocast`.)

Not mapped, refused with a ConfigError by framework/kernels/choice.py before any model is built: score biases
(ALiBi, T5 relative bias, soft distance bias — TE's `core_attention_bias` does not use Loom's position ids),
prefix-LM masks, and document masks in cross-attention. Not used: `LayerNormLinear` / `LayerNormMLP`, whose fused
norms rename the parameters (`layer_norm_weight`, `fc1_weight`, ...) and would break Loom's stable parameter names,
checkpoints and HF conversion; `te.Linear` is not used with tensor parallelism (Loom's TP plans shard nn.Linear).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from framework.models.attention import Attention, AttentionContext, KernelCall
from framework.models.masks import AttentionMask

if TYPE_CHECKING:  # annotations only: never imported at run time from here
    import transformer_engine.pytorch as te

TE_VERSION = "2.20.2"
INSTALL_HINT = (
    "on a CUDA machine: pip install 'loom-pretrain[gpu]' "
    f"(transformer-engine[pytorch]=={TE_VERSION}; it builds against the installed CUDA torch and needs cuDNN)"
)
Fp8RecipeName = Literal["delayed", "current", "mxfp8"]


def import_te() -> ModuleType:
    """transformer_engine.pytorch, or ImportError naming the `gpu` extra."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except (ImportError, OSError, RuntimeError) as err:  # OSError: cuDNN / CUDA shared objects missing
        raise ImportError(f"Transformer Engine is not importable ({err}); install it {INSTALL_HINT}") from err


def te_importable() -> bool:
    """Whether transformer_engine.pytorch imports here (False on every machine without CUDA and cuDNN)."""
    try:
        import_te()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ContextParallelArgs:
    """TE's own context parallelism for DotProductAttention (ring "p2p" or Ulysses-like "a2a")."""

    group: Any
    """The cp ProcessGroup."""
    global_ranks: list[int]
    comm_type: Literal["p2p", "a2a"] = "p2p"
    stream: Any = None
    """A torch.cuda.Stream for overlapping the ring's steps (p2p)."""


def with_ring(group: Any, global_ranks: list[int], stream: Any = None) -> ContextParallelArgs:
    """TE's own ring ("p2p") over `group` for a Loom ring of cp_ring ranks (module docstring)."""
    return ContextParallelArgs(group=group, global_ranks=global_ranks, comm_type="p2p", stream=stream)


class TEAttention:
    """Attention.kernel backed by te.DotProductAttention. A plain object, not a module: the model's state dict
    and parameter names do not change. One TE module per (heads, kv heads, head dim, scale, dropout), built on
    first use on the current CUDA device (TE modules cannot be built on CPU)."""

    def __init__(self, context_parallel: ContextParallelArgs | None = None) -> None:
        self.context_parallel = context_parallel
        self._modules: dict[tuple[int, int, int, float, float], Any] = {}

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, call: KernelCall
    ) -> torch.Tensor:
        batch, heads, q_len, head_dim = q.shape
        mask = ctx.mask
        check_mask(mask, q_len, k.shape[2])
        if self.context_parallel is not None and (mask.q_documents is not None or mask.window is not None):
            raise NotImplementedError(
                "kernels te: TE's context parallelism is mapped for causal / full masks"
            )
        if call.inv_temperature is not None:
            q = q * call.inv_temperature.view(1, -1, 1, 1).to(q.dtype)
        # TE requires q, k and v of one dtype. With qk_norm the RMSNorm's fp32 weight promotes bf16 q and k to
        # fp32 (framework/models/norms.py) while v stays bf16: v's dtype is the one the run computes in.
        q, k = q.to(v.dtype), k.to(v.dtype)
        dpa = self._module(heads, k.shape[1], head_dim, call)
        mask_type, window = mask_kind(mask)
        if mask.q_documents is None:
            out = _run_bshd(dpa, q, k, v, mask_type, window)
        else:
            out = _run_thd(dpa, q, k, v, mask.q_documents, mask_type, window)
        return out.reshape(batch, q_len, heads, head_dim).transpose(1, 2)

    def _module(self, heads: int, kv_heads: int, head_dim: int, call: KernelCall) -> Any:
        key = (heads, kv_heads, head_dim, call.scale, call.dropout_p)
        if key not in self._modules:
            self._modules[key] = _dot_product_attention(key, self.context_parallel)
        return self._modules[key]


def _dot_product_attention(key: tuple[int, int, int, float, float], cp: ContextParallelArgs | None) -> Any:
    te = import_te()
    heads, kv_heads, head_dim, scale, dropout_p = key
    # Every keyword spelled out (no **kwargs) so the contract test can check each name against TE's sources.
    return te.DotProductAttention(
        num_attention_heads=heads,
        kv_channels=head_dim,
        num_gqa_groups=kv_heads,
        attention_dropout=dropout_p,
        qkv_format="bshd",
        attn_mask_type="causal",
        softmax_scale=scale,
        cp_group=None if cp is None else cp.group,
        cp_global_ranks=None if cp is None else cp.global_ranks,
        cp_comm_type="p2p" if cp is None else cp.comm_type,
        cp_stream=None if cp is None else cp.stream,
    )


def check_mask(mask: AttentionMask, q_len: int, k_len: int) -> None:
    """Refuse masks TE cannot express the way Loom means them (the recipe check refuses them earlier)."""
    if mask.prefix_lengths is not None:
        raise NotImplementedError("kernels te: prefix-LM masks are not mapped to Transformer Engine")
    if mask.q_documents is not None and (mask.k_documents is not mask.q_documents or q_len != k_len):
        raise NotImplementedError("kernels te: document masks are mapped for self-attention only")
    if mask.causal and q_len != k_len:
        raise NotImplementedError("kernels te: causal attention needs as many queries as keys")


def mask_kind(mask: AttentionMask) -> tuple[str, tuple[int, int] | None]:
    """(attn_mask_type, window_size) meaning the same as `mask` (documents become TE's padding via cu_seqlens)."""
    padding = mask.q_documents is not None
    if mask.causal:
        kind = "padding_causal" if padding else "causal"
    else:
        kind = "padding" if padding else "no_mask"
    if mask.window is None:
        return kind, None
    # TE: query i sees keys [i - left, i + right] inclusive (-1 = unbounded); Loom: i - j < window.
    return kind, (mask.window - 1, 0 if mask.causal else -1)


def cu_seqlens(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, S] document ids -> (int32 starts of each run of equal ids in the flattened batch plus B * S, longest
    run). Each row starts a new run. Loom packs documents as contiguous runs, so runs are documents."""
    batch, seq = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    index = starts.flatten().nonzero().flatten()
    cu = torch.cat([index, index.new_tensor([batch * seq])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())  # one host sync: TE would otherwise compute it itself


def _run_bshd(
    dpa: te.DotProductAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_type: str,
    window: tuple[int, int] | None,
) -> torch.Tensor:
    def bshd(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).contiguous()

    return dpa(bshd(q), bshd(k), bshd(v), qkv_format="bshd", attn_mask_type=mask_type, window_size=window)


def _run_thd(
    dpa: te.DotProductAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: torch.Tensor,
    mask_type: str,
    window: tuple[int, int] | None,
) -> torch.Tensor:
    cu, longest = cu_seqlens(documents)

    def thd(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

    return dpa(
        thd(q),
        thd(k),
        thd(v),
        qkv_format="thd",
        attn_mask_type=mask_type,
        window_size=window,
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def install_te_attention(model: nn.Module, context_parallel: ContextParallelArgs | None = None) -> int:
    """Route every Attention layer of `model` through TE; returns how many layers were switched."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.kernel = TEAttention(context_parallel)
    return len(layers)


def swap_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a te.Linear with the same parameter names and values (for TE
    FP8). Returns how many were replaced."""
    te = import_te()
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _te_linear(te, child))
                count += 1
    return count


def _te_linear(te: ModuleType, linear: nn.Linear) -> nn.Module:
    weight = linear.weight
    new = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def fp8_recipe(name: Fp8RecipeName) -> Any:
    """TE's scaling recipe object: delayed (amax history), current (per-tensor, this step) or mxfp8 (blocks)."""
    from transformer_engine.common import recipe as te_recipe

    if name == "delayed":
        return te_recipe.DelayedScaling(
            fp8_format=te_recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        )
    if name == "current":
        return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    return te_recipe.MXFP8BlockScaling(fp8_format=te_recipe.Format.E4M3)


def fp8_supported(name: Fp8RecipeName) -> tuple[bool, str]:
    """(whether this GPU runs the recipe, TE's reason when it does not)."""
    te = import_te()
    if name == "mxfp8":
        return te.is_mxfp8_available(return_reason=True)
    return te.is_fp8_available(return_reason=True)


def fp8_context(name: Fp8RecipeName, amax_group: Any = None) -> contextlib.AbstractContextManager:
    """The forward region in which te.Linear / te attention run in FP8 with recipe `name`; amaxes are reduced
    over `amax_group` (the data-parallel group) when given."""
    te = import_te()
    return te.autocast(enabled=True, recipe=fp8_recipe(name), amax_reduction_group=amax_group)
