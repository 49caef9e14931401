"""FP8 training (`precision.dtype: fp8`): which Linear layers run their matmuls in float8, and how.

Two backends (`precision.fp8_backend`):

- torchao (the `fp8` extra): `torchao.float8.convert_to_float8_training` swaps each chosen `nn.Linear` for a
  `Float8Linear` (an nn.Linear subclass: same `weight` / `bias` names, so checkpoints, initialisation and HF
  export are unchanged). Its forward casts input and weight to e4m3 and the output gradient to e5m2 with dynamic
  scales (per tensor or per row) and multiplies with `torch._scaled_mm`; everything else runs in bf16 autocast.
  Without an fp8-capable GPU (CPU, tests) torchao's `emulate=True` does the same casts and multiplies in high
  precision: the rounding, and so the loss, is that of fp8.
- te (the `gpu` extra): each chosen Linear becomes a `te.Linear` (framework/kernels/te.py `swap_linears`) and the
  forward runs under TE's fp8 autocast (`fp8_context`) with recipe delayed / current / mxfp8.

The chosen layers: every Linear of the transformer blocks whose sizes are multiples of 16 (what fp8 GEMMs
need), except MoE routers (their softmax / top-k decides where tokens go) and, with `fp8_skip_first_last`, the
output head and the first and last blocks (the layers most sensitive to quantisation error).

Where it runs: before any parallel step (framework/parallel/parallelize.py step 0; framework/run.py for one
process), so TP plans and FSDP2 wrap Float8Linear modules whose parameters are still plain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from framework.config.errors import ConfigError
from framework.config.schema import PrecisionConfig, Recipe

log = logging.getLogger(__name__)

TORCHAO_VERSION = "0.18.0"

# The compute dtype of each `precision.dtype` (the one map: FSDP2's param dtype in framework/parallel/parallelize.py,
# autocast's in framework/train/precision.py). fp8 computes in bf16: the float8 Linear layers cast their own
# operands inside bf16 autocast, and FSDP2 gathers bf16 parameters for them.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
TORCHAO_HINT = f"pip install 'loom-pretrain[fp8]' (torchao=={TORCHAO_VERSION})"
FP8_MIN_CAPABILITY = (8, 9)
"""float8 tensor-core GEMMs (torch._scaled_mm): Ada (sm_89) and Hopper (sm_90) onwards."""


def import_torchao_float8() -> ModuleType:
    """torchao.float8, or a ConfigError naming the `fp8` extra."""
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as err:
        raise ConfigError(
            None, "precision.fp8_backend", "torchao", f"torchao is not installed ({err})", TORCHAO_HINT
        ) from err


def check_fp8(recipe: Recipe, device: torch.device) -> None:
    """Refuse an fp8 recipe this machine or layout cannot run (one ConfigError), before any model is built."""
    p = recipe.precision
    if p.dtype != "fp8":
        return
    if p.fp8_backend == "torchao":
        import_torchao_float8()
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
            raise ConfigError(
                None, "precision.dtype", "fp8", f"{torch.cuda.get_device_name(device)} has no fp8 tensor cores",
                "use precision.dtype: bf16, or a GPU of compute capability 8.9+ (L4, L40S, H100, B200)",
            )  # fmt: skip
        return
    _check_te(recipe, device)


def _check_te(recipe: Recipe, device: torch.device) -> None:
    te = _te_module()
    fix = f"use precision.fp8_backend: torchao, or install the gpu extra {te.INSTALL_HINT}"
    if device.type != "cuda":
        raise ConfigError(None, "precision.fp8_backend", "te", f"TE runs on CUDA only (device {device})", fix)
    if recipe.parallel.tp > 1:
        raise ConfigError(
            None, "precision.fp8_backend", "te", "te.Linear is not laid out by Loom's TP plans (parallel.tp > 1)",
            "use precision.fp8_backend: torchao with tensor parallelism",
        )  # fmt: skip
    if not te.te_importable():
        raise ConfigError(None, "precision.fp8_backend", "te", "Transformer Engine is not importable", fix)
    name = recipe.precision.resolved_fp8_recipe
    ok, why = te.fp8_supported(name)
    if not ok:
        raise ConfigError(None, "precision.fp8_recipe", name, f"not supported on this GPU: {why}", fix)


def _te_module() -> ModuleType:
    """framework.kernels.te with the functions this file calls (a clear error if the seam lacks one)."""
    te = importlib.import_module("framework.kernels.te")
    missing = [
        f for f in ("swap_linears", "fp8_context", "fp8_supported", "te_importable") if not hasattr(te, f)
    ]
    if missing:
        raise ConfigError(
            None, "precision.fp8_backend", "te", f"framework/kernels/te.py lacks {', '.join(missing)}",
            "use precision.fp8_backend: torchao",
        )  # fmt: skip
    return te


def fp8_filter(model: nn.Module, skip_first_last: bool) -> Callable[[nn.Module, str], bool]:
    """module_filter_fn for `model`: True for each Linear (by qualified name) that should run in fp8."""
    skipped = _first_last_blocks(model) if skip_first_last else set()

    def convert(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # torchao asks about containers too: descend into them
        if module.in_features % 16 or module.out_features % 16 or "router" in fqn.split("."):
            return False
        block = _block_of(fqn)
        if block is None:  # outside the blocks: the output head (and any projection next to the embedding)
            return not skip_first_last
        return block not in skipped

    return convert


def _block_of(fqn: str) -> str | None:
    """'layers.3.attention.wq' -> 'layers.3'; 'decoder.layers.0.x' -> 'decoder.layers.0'; None outside."""
    parts = fqn.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers":
            return ".".join(parts[: i + 2])
    return None


def _first_last_blocks(model: nn.Module) -> set[str]:
    """The first and last block of every `layers` ModuleDict (decoder; encoder and decoder stacks)."""
    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleDict) and name.rsplit(".", 1)[-1] == "layers" and len(module):
            keys = list(module.keys())
            found |= {f"{name}.{keys[0]}", f"{name}.{keys[-1]}"}
    return found


def apply_fp8(model: nn.Module, cfg: PrecisionConfig, device: torch.device | str) -> nn.Module:
    """Convert the chosen Linear layers of `model` (on `device` or meta) for fp8 training; a no-op unless
    cfg.dtype is fp8. Must run on the whole model, before pipeline split, TP and FSDP."""
    if cfg.dtype != "fp8":
        return model
    keep = fp8_filter(model, cfg.fp8_skip_first_last)
    if cfg.fp8_backend == "te":
        count = _swap_te(model, keep)
    else:
        count = _convert_torchao(model, cfg, device, keep)
    log.info("fp8 (%s, %s): %d Linear layers converted", cfg.fp8_backend, cfg.resolved_fp8_recipe, count)
    return model


def _convert_torchao(
    model: nn.Module, cfg: PrecisionConfig, device: torch.device | str, keep: Callable[[nn.Module, str], bool]
) -> int:
    float8 = import_torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(cfg.resolved_fp8_recipe)
    # Emulation off CUDA: same fp8 rounding, high-precision matmul (torch._scaled_mm needs fp8 tensor cores).
    config = dataclasses.replace(config, emulate=torch.device(device).type != "cuda")
    float8.convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return len(float8_linear_names(model))


def float8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules torchao converted (its Float8Linear)."""
    float8_linear = importlib.import_module("torchao.float8.float8_linear").Float8Linear
    return [name for name, m in model.named_modules() if isinstance(m, float8_linear)]


def _swap_te(model: nn.Module, keep: Callable[[nn.Module, str], bool]) -> int:
    te = _te_module()
    chosen = [(fqn, m) for fqn, m in model.named_modules() if type(m) is nn.Linear and keep(m, fqn)]
    for fqn, linear in chosen:
        parent_name, _, child = fqn.rpartition(".")
        box = nn.Module()  # swap_linears replaces every Linear under a module: give it just this one
        box.add_module("linear", linear)
        te.swap_linears(box)
        setattr(model.get_submodule(parent_name), child, box.linear)
    return len(chosen)


def fp8_context(cfg: PrecisionConfig, amax_group: Any = None) -> contextlib.AbstractContextManager:
    """The forward region's fp8 context: TE's fp8 autocast for the te backend (amaxes reduced over
    `amax_group`), nothing otherwise (torchao's Float8Linear casts by itself)."""
    if cfg.dtype != "fp8" or cfg.fp8_backend != "te":
        return contextlib.nullcontext()
    return _te_module().fp8_context(cfg.resolved_fp8_recipe, amax_group)
