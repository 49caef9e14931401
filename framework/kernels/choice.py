"""Which kernel library a run uses: `model.kernels` (auto | torch | te) meets the device, once, before any model
is built. Asking for what this machine or this recipe cannot do is one ConfigError."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from framework.config.errors import ConfigError
from framework.config.schema import Recipe
from framework.kernels.te import INSTALL_HINT, te_importable

log = logging.getLogger(__name__)

Kernels = Literal["torch", "te"]


def te_refusals(recipe: Recipe) -> list[tuple[str, object, str]]:
    """(key, value, why) for each recipe feature TE attention does not express as Loom means it."""
    m, refused = recipe.model, []
    if m.position in ("alibi", "relative_bias"):
        refused.append(("model.position", m.position, "TE attention takes no Loom score bias"))
    if m.soft_distance_bias:
        refused.append(("model.soft_distance_bias", True, "TE attention takes no Loom score bias"))
    if m.attention_softcap is not None:
        refused.append(
            ("model.attention_softcap", m.attention_softcap, "TE attention has no score soft-capping")
        )
    if m.attention_sinks:  # TE's softmax_type "learnable" is not mapped yet
        refused.append(("model.attention_sinks", True, "Loom's attention sinks are not mapped to TE"))
    if recipe.data.objective == "prefix":
        refused.append(("data.objective", "prefix", "prefix-LM masks are not mapped to TE"))
    if m.family == "encoder_decoder" and recipe.data.document_masking:
        refused.append(
            ("data.document_masking", True, "TE document masks are mapped for self-attention only")
        )
    return refused + _te_ring_refusals(recipe)


def _te_ring_refusals(recipe: Recipe) -> list[tuple[str, object, str]]:
    """With ring attention (parallel.cp_ring > 1) TE runs its own ring (cp_comm_type "p2p") on Loom's zigzag
    shards, which are TE's dual-chunk-swap shards; what else TE's CP would shard or mask differently is refused
    (model.kernels auto then runs Loom's torch ring)."""
    p, m = recipe.parallel, recipe.model
    if p.cp_ring == 1:
        return []
    refused: list[tuple[str, object, str]] = []
    if p.resolved_cp_ulysses > 1:
        refused.append(("parallel.cp_ulysses", p.resolved_cp_ulysses,
                        "TE's hierarchical a2a+p2p CP is not mapped onto Loom's hybrid token order"))  # fmt: skip
    if recipe.data.document_masking:
        refused.append(("data.document_masking", True,
                        "TE's CP shards every document apart (thd); Loom's ring shards the packed sequence"))  # fmt: skip
    if m.sliding_window is not None or "attention_local" in m.mixers:
        refused.append(("model.sliding_window", m.sliding_window or m.layers.local_window,
                        "TE's p2p CP is not mapped with sliding windows"))  # fmt: skip
    if not p.cp_load_balance:
        refused.append(("parallel.cp_load_balance", False, "TE's p2p CP expects zigzag (dual-chunk) shards"))
    return refused


def resolve_kernels(
    recipe: Recipe, device: torch.device, importable: Callable[[], bool] = te_importable
) -> Kernels:
    """torch or te for this run. auto: te when TE imports, the device is CUDA and the recipe maps; else torch."""
    wanted = recipe.model.kernels
    if wanted == "torch":
        return "torch"
    refused = te_refusals(recipe)
    if wanted == "auto":
        if device.type != "cuda" or not importable():
            return "torch"
        if refused:
            log.info("kernels auto: torch, because %s = %r (%s)", *refused[0])
            return "torch"
        return "te"
    if device.type != "cuda":
        raise ConfigError(
            None, "model.kernels", "te", f"Transformer Engine runs on CUDA only (device {device.type})",
            "set model.kernels: auto or torch, or run on an NVIDIA GPU",
        )  # fmt: skip
    if refused:
        key, value, why = refused[0]
        raise ConfigError(None, key, value, f"{why} (model.kernels: te)", "set model.kernels: torch or auto")
    if not importable():
        raise ConfigError(
            None, "model.kernels", "te", "Transformer Engine is not importable here",
            f"install the gpu extra {INSTALL_HINT}, or set model.kernels: auto",
        )  # fmt: skip
    return "te"


def use_kernels(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Route `model`'s attention through the chosen library (torch: unchanged), and its recurrent mixers through
    their kernel libraries where installed (`use_mixer_kernels`)."""
    if kernels == "te":
        from framework.kernels.te import install_te_attention

        layers = install_te_attention(model)
        log.info("kernels te: %d attention layers on transformer_engine DotProductAttention", layers)
    use_mixer_kernels(model)
    return model


def use_mixer_kernels(model: nn.Module) -> dict[str, int]:
    """Gated DeltaNet on flash-linear-attention and Mamba-2 on mamba_ssm, each when it imports here and the
    model has such layers. The modules call a kernel only for CUDA tensors (else their exact PyTorch chunked
    form), so installing on a CPU run changes nothing; a missing library is not an error."""
    from framework.kernels import fla, mamba_ssm
    from framework.models.gdn import GatedDeltaNet
    from framework.models.mamba2 import Mamba2

    counts = {"fla": 0, "mamba_ssm": 0}
    gdn = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    if gdn and fla.available():
        for module in gdn:
            module.kernel = fla.fla_gated_delta_rule
        counts["fla"] = len(gdn)
    if any(isinstance(m, Mamba2) for m in model.modules()) and mamba_ssm.available():
        counts["mamba_ssm"] = mamba_ssm.install_mamba_ssm(model)
    for library, layers in counts.items():
        if layers:
            log.info("kernels %s: %d recurrent layers on CUDA", library, layers)
    return counts
