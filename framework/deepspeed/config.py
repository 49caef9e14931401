"""The DeepSpeed config Loom generates from a recipe, the layouts the engine refuses, and the check of user keys.

DeepSpeed reads a JSON config. Loom writes it from the recipe so that one recipe runs on either engine:
batch sizes (train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks = train.global_batch_size),
gradient_clipping = optim.grad_clip, and zero_optimization from the `deepspeed` section. `deepspeed.config` adds
raw DeepSpeed keys on top. DeepSpeed's own top-level parser ignores keys it does not know, so a typo would be
silently dropped: Loom checks top-level keys against the names DeepSpeed defines, and each section DeepSpeed
models with pydantic (extra keys forbidden) through that model, so a nested typo is an error too.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from types import ModuleType
from typing import Any

import torch

from framework.config.errors import ConfigError, did_you_mean
from framework.config.schema import Recipe

DEEPSPEED_VERSION = "0.19.8"
DEEPSPEED_HINT = f"pip install 'loom-pretrain[deepspeed]' (deepspeed=={DEEPSPEED_VERSION})"

# Sections DeepSpeed validates with a pydantic model (module, class); the other sections are plain dicts.
_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
}
# Modules whose upper-case string constants are DeepSpeed's config key names.
_CONSTANT_MODULES = (
    "deepspeed.runtime.constants",
    "deepspeed.runtime.zero.constants",
    "deepspeed.runtime.activation_checkpointing.config",
    "deepspeed.profiling.constants",
    "deepspeed.monitor.config",
    "deepspeed.comm.constants",
    "deepspeed.autotuning.constants",
    "deepspeed.compression.constants",
    "deepspeed.runtime.data_pipeline.constants",
    "deepspeed.elasticity.constants",
    "deepspeed.checkpoint.constants",
)


def import_deepspeed(device: torch.device) -> ModuleType:
    """deepspeed, imported for `device` (its CPU accelerator off CUDA), or a ConfigError naming the extra."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, on DeepSpeed's first accelerator lookup
    try:
        deepspeed = importlib.import_module("deepspeed")
    except ImportError as err:
        raise ConfigError(
            None, "parallel.engine", "deepspeed", f"deepspeed is not installed ({err})", DEEPSPEED_HINT
        ) from err
    if device.type == "cpu":
        # DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce (30-130 s of g++) on first init when
        # its op probe says it can; gloo already does the collectives on CPU, so report no compiled op usable.
        # (An empty table also stops the probe itself, which runs compiler subprocesses.)
        importlib.import_module("deepspeed.ops").__compatible_ops__ = {}
    return deepspeed


def check_deepspeed(
    recipe: Recipe, world_size: int, resume: str | None, device: torch.device | None = None
) -> None:
    """Refuse, as one ConfigError, what the DeepSpeed engine cannot run (before any process group exists)."""
    if recipe.precision.dtype == "fp16" and device is not None and device.type == "cpu":
        raise ConfigError(None, "precision.dtype", "fp16", "DeepSpeed's CPU accelerator has no fp16 "
                          "('Type fp16 is not supported on your device')", "use precision.dtype: bf16 or fp32 on CPU")  # fmt: skip
    p, fix = recipe.parallel, "use parallel.engine: native for this layout"
    _check_sequence_parallel(recipe, world_size)
    for name in ("tp", "pp", "ep"):
        if getattr(p, name) > 1:
            raise ConfigError(
                None, f"parallel.{name}", getattr(p, name),
                "Loom's tensor/pipeline/context/expert parallelism does not combine with the DeepSpeed engine "
                "(DeepSpeed shards with ZeRO over every rank; sequence parallel is parallel.cp)", fix,
            )  # fmt: skip
    _refuse(p.cpu_offload, "parallel.cpu_offload", "an FSDP2 option", "use deepspeed.offload_optimizer: cpu")
    _refuse(p.activation_checkpointing != "none", "parallel.activation_checkpointing",
            "not applied by the DeepSpeed engine yet", "set parallel.activation_checkpointing: none")  # fmt: skip
    _refuse(
        p.compile,
        "parallel.compile",
        "not applied by the DeepSpeed engine yet",
        "set parallel.compile: false",
    )
    _refuse(recipe.precision.dtype == "fp8", "precision.dtype", "fp8 runs on the native engine",
            "use precision.dtype: bf16 or fp16")  # fmt: skip
    _check_fp16(recipe)
    _refuse(
        recipe.model.moe is not None,
        "model.moe",
        "MoE models run on the native engine (expert parallel)",
        fix,
    )
    if recipe.checkpoint.async_save:
        raise ConfigError(None, "checkpoint.async_save", True, "DeepSpeed writes its checkpoint files itself, "
                          "synchronously", "set checkpoint.async_save: false")  # fmt: skip
    _refuse(recipe.train.spike_sigma > 0, "train.spike_sigma",
            "DeepSpeed applies each update inside its step: Loom cannot skip one", "set train.spike_sigma: 0")  # fmt: skip
    _refuse(recipe.train.batch_ramp is not None, "train.batch_ramp", "DeepSpeed fixes its accumulation steps "
            "in its config", "use parallel.engine: native for a batch-size ramp")  # fmt: skip
    # ZeRO flattens and partitions the parameter groups: Newton-Schulz would see slices of flat buffers
    if recipe.optim.name == "muon":
        raise ConfigError(None, "optim.name", "muon", "ZeRO partitions flattened parameter groups, so Muon would "
                          "orthogonalise slices, not matrices", "use parallel.engine: native (FSDP2) for Muon")  # fmt: skip
    _check_batch(recipe, world_size)
    validate_user_config(recipe.deepspeed.config)


def _refuse(bad: bool, key: str, rule: str, fix: str) -> None:
    if bad:
        raise ConfigError(None, key, "set", rule, fix)


def _check_sequence_parallel(recipe: Recipe, world_size: int) -> None:
    """parallel.cp > 1: DeepSpeed-Ulysses over blocks of cp ranks; heads and tokens must split evenly."""
    cp, m = recipe.parallel.cp, recipe.model
    rules = [
        (world_size % cp == 0, "parallel.cp", cp, f"must divide the {world_size} processes", "pick a divisor"),
        (m.n_heads % cp == 0, "model.n_heads", m.n_heads, f"must be divisible by parallel.cp={cp}", "change cp"),
        (m.resolved_kv_heads % cp == 0, "model.kv_heads", m.resolved_kv_heads,
         f"must be divisible by parallel.cp={cp} (DeepSpeed-Ulysses splits key/value heads too)", "change cp"),
        (recipe.data.seq_len % cp == 0, "data.seq_len", recipe.data.seq_len,
         f"must be divisible by parallel.cp={cp}", "change seq_len or cp"),
    ]  # fmt: skip
    for ok, key, value, rule, fix in rules:
        if not ok:
            raise ConfigError(None, key, value, rule, fix)


def _check_fp16(recipe: Recipe) -> None:
    """DeepSpeed's dynamic loss scaler starts at a power of two and grows x2 / backs off x0.5."""
    p = recipe.precision
    if p.dtype != "fp16":
        return
    if math.log2(p.loss_scale_init) % 1:
        raise ConfigError(None, "precision.loss_scale_init", p.loss_scale_init,
                          "DeepSpeed starts its loss scale at a power of two", "use e.g. 65536")  # fmt: skip
    for key, value, wanted in (("growth_factor", p.loss_scale_growth_factor, 2.0),
                               ("backoff_factor", p.loss_scale_backoff_factor, 0.5)):  # fmt: skip
        if value != wanted:
            raise ConfigError(None, f"precision.loss_scale_{key}", value,
                              f"DeepSpeed's loss scaler uses {wanted}", f"set it to {wanted}")  # fmt: skip


def _check_batch(recipe: Recipe, world_size: int) -> None:
    t = recipe.train
    per_step = t.micro_batch_size * (world_size // recipe.parallel.cp)
    if t.global_batch_size % per_step:
        raise ConfigError(
            None, "train.global_batch_size", t.global_batch_size,
            f"must be a multiple of micro_batch_size x data-parallel ranks = {t.micro_batch_size} x "
            f"{world_size // recipe.parallel.cp}",
            f"use a multiple of {per_step}",
        )  # fmt: skip


def ds_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for `recipe` on `world_size` ranks (every rank is a data-parallel rank)."""
    t, d = recipe.train, recipe.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer}
    if d.offload_params != "none":
        zero["offload_param"] = {"device": d.offload_params}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        # sequence peers (parallel.cp) read the same samples: data-parallel ranks = world / cp
        "gradient_accumulation_steps": t.global_batch_size
        // (t.micro_batch_size * world_size // recipe.parallel.cp),
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        # Loom passes its own torch AdamW (same update as the native engine); DeepSpeed would otherwise insist
        # on its JIT-compiled CPU Adam whenever the optimizer is offloaded.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # Loom logs the steps
    }
    if recipe.precision.dtype == "fp16":
        # DeepSpeed's fp16 mode: fp16 weights, an fp32 master copy in the optimizer, dynamic loss scaling
        p = recipe.precision
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(math.log2(p.loss_scale_init)),
                          "loss_scale_window": p.loss_scale_growth_interval, "hysteresis": 1, "min_loss_scale": 1}  # fmt: skip
    return merge(config, recipe.deepspeed.config)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it; nested mappings merge key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate_user_config(extra: dict[str, Any]) -> None:
    """ConfigError for an unknown top-level key (with did-you-mean) or a section DeepSpeed's model rejects."""
    if not extra:
        return
    import_deepspeed(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    known = known_keys()
    for key, value in extra.items():
        dotted = f"deepspeed.config.{key}"
        if key not in known:
            raise ConfigError(None, dotted, value, "is not a DeepSpeed config key", did_you_mean(key, known))
        if key in _MODELS and isinstance(value, dict):
            _validate_section(key, value)


def known_keys() -> list[str]:
    """Every config key name DeepSpeed's constant modules define (top-level and nested names alike)."""
    names: set[str] = set(_MODELS)
    for module_name in _CONSTANT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names |= {
            v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and v.isidentifier()
        }
    return sorted(names)


def _validate_section(key: str, value: dict[str, Any]) -> None:
    module_name, class_name = _MODELS[key]
    model = getattr(importlib.import_module(module_name), class_name)
    pydantic = importlib.import_module("pydantic")
    try:
        model(**value)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        bad = f"deepspeed.config.{key}.{where}"
        top_level_typo = first["type"] == "extra_forbidden" and len(first["loc"]) == 1
        fix = (
            did_you_mean(where, list(model.model_fields)) if top_level_typo else "see DeepSpeed's config docs"
        )
        raise ConfigError(
            None, bad, first.get("input"), f"DeepSpeed rejects it: {first['msg']}", fix
        ) from None
