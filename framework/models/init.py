"""Parameter initialisation from (seed, parameter name) only.

Every tensor draws from its own CPU `torch.Generator` seeded by a stable hash of f"{seed}:{name}", so a
parameter gets the same values whatever device it lives on, whatever other parameters exist (pipeline stages)
and whether the model was built directly or on the meta device and materialised with `to_empty`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.config.schema import ModelConfig
from framework.models.attention import Attention
from framework.models.moe import GroupedExperts
from framework.models.norms import OffsetRMSNorm, RMSNorm

# prefixes that torch wrappers (compile, activation checkpointing, FSDP1) insert into parameter names
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass
class _Group:
    names: list[str]
    std: float
    fill: float | None = None
    """Constant value instead of a normal draw (std is then 0)."""
    draws: dict[str, Callable[[torch.Generator], torch.Tensor]] = field(default_factory=dict)
    """module_drawn only: name -> the owning module's `initial_value(param_name, generator)` (std is then 0)."""


def canonical_name(name: str) -> str:
    """The parameter name without wrapper prefixes, so wrapping never changes the init."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def stable_seed(seed: int, name: str) -> int:
    """63-bit generator seed from sha256(f"{seed}:{name}") (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _group_of(cfg: ModelConfig, module_name: str, module: nn.Module, param_name: str) -> str:
    if param_name in getattr(module, "own_init", ()):
        return "module_drawn"  # e.g. Mamba2's A_log / dt_bias: distributions no std expresses
    if param_name in ("bias", "output_bias") or (isinstance(module, GroupedExperts) and param_name[0] == "b"):
        return "biases"
    if isinstance(module, OffsetRMSNorm):
        return "offset_norms"
    if isinstance(module, RMSNorm | nn.LayerNorm):
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, Attention):
        return {"log_temperature": "temperatures", "distance_weight": "distance_weights", "sinks": "sinks"}[
            param_name
        ]
    if module_name.endswith((".wo", ".w2", ".out_proj")) or (
        isinstance(module, GroupedExperts) and param_name == "w2"
    ):
        in_decoder = cfg.family == "encoder_decoder" and module_name.startswith("decoder.")
        return "decoder_output_projections" if in_decoder else "output_projections"
    return "matrices"


def _group_specs(cfg: ModelConfig) -> dict[str, _Group]:
    """Std (or constant) of each group. Output projections follow GPT-2: init_std / sqrt(2 * blocks of the
    stack the projection adds into), since each block adds two branches to the residual stream."""

    def out_std(blocks: int) -> float:
        return cfg.init_std / math.sqrt(2 * blocks) if cfg.init_depth_scaled else cfg.init_std

    emb_std = cfg.embedding_init_std if cfg.embedding_init_std is not None else cfg.init_std
    return {
        "embeddings": _Group([], emb_std),
        "matrices": _Group([], cfg.init_std),
        "output_projections": _Group([], out_std(cfg.n_layers)),
        "decoder_output_projections": _Group([], out_std(cfg.decoder_layers)),
        "norms": _Group([], 0.0, fill=1.0),
        "offset_norms": _Group([], 0.0, fill=0.0),  # gain 1 + w = 1 (Gemma's RMSNorm)
        "biases": _Group([], 0.0, fill=0.0),
        "temperatures": _Group([], 0.0, fill=math.log(cfg.attention_temperature)),
        "distance_weights": _Group([], 0.0, fill=0.0),
        "sinks": _Group([], 0.0, fill=0.0),  # logit 0: a sink weighs as one key with a zero logit at init
        "module_drawn": _Group([], 0.0),
    }


def _groups(model: nn.Module, cfg: ModelConfig) -> dict[str, _Group]:
    groups = _group_specs(cfg)
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            group = groups[_group_of(cfg, module_name, module, param_name)]
            group.names.append(full)
            if group is groups["module_drawn"]:
                group.draws[full] = functools.partial(module.initial_value, param_name)
    return {name: group for name, group in groups.items() if group.names}


def init_groups(model: nn.Module, cfg: ModelConfig) -> dict[str, tuple[list[str], float]]:
    """Group name -> (parameter names, std). Constant groups (norms 1, offset norms 0, biases 0, temperatures
    log(attention_temperature) as they are stored as log_temperature, distance weights 0) and module_drawn
    (parameters whose module draws them itself through `initial_value`, as Mamba2's A_log) have std 0."""
    return {name: (group.names, group.std) for name, group in _groups(model, cfg).items()}


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter in place, and the MoE selection biases (the only buffers; RoPE/sinusoids are
    computed on the fly) to 0. Plain tensors only; framework/parallel/init.py does the same for sharded ones."""
    for _, tensor, value in initial_values(model, cfg, seed):
        tensor.copy_(value)


def initial_values(
    model: nn.Module, cfg: ModelConfig, seed: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the parameter or buffer, its whole initial value on the CPU) for every tensor `init_weights` sets.

    The value has the tensor's global shape (a DTensor reports its global shape), so a rank holding one shard can
    cut its part from it: the values depend only on (seed, name), never on the layout. Stacked expert weights
    [E, ...] draw each expert's slice from its own generator, seeded by f"{name}.{e}", so an expert-parallel rank
    holding only some experts gets the same values. Computed one tensor at a time (peak memory: one tensor)."""
    params = {canonical_name(name): p for name, p in model.named_parameters()}
    stacked = _stacked_expert_names(model)
    for group in _groups(model, cfg).values():
        for name in group.names:
            param = params[name]
            yield name, param, _initial_value(param, group, seed, name, stacked=name in stacked)
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            yield canonical_name(name), buffer, torch.zeros(buffer.shape, dtype=buffer.dtype)


def _initial_value(
    param: torch.Tensor, group: _Group, seed: int, name: str, *, stacked: bool
) -> torch.Tensor:
    if name in group.draws:
        return group.draws[name](torch.Generator().manual_seed(stable_seed(seed, name)))
    if group.fill is not None:
        # In the parameter's own dtype, so copying it in equals fill_ (no detour through fp32 rounding).
        return torch.full(param.shape, group.fill, dtype=param.dtype)
    if stacked:
        return torch.stack(
            [_normal(param.shape[1:], group.std, seed, f"{name}.{e}") for e in range(param.shape[0])]
        )
    return _normal(param.shape, group.std, seed, name)


def _normal(shape: torch.Size, std: float, seed: int, name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(stable_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def _stacked_expert_names(model: nn.Module) -> set[str]:
    return {
        canonical_name(f"{module_name}.{param_name}")
        for module_name, module in model.named_modules()
        if isinstance(module, GroupedExperts)
        for param_name, _ in module.named_parameters(recurse=False)
    }
