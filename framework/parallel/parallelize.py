"""Lay a built model out over a DeviceMesh, in one fixed order.

    1. PP split      stages keep the full model's parameter names (delete what a stage does not own)
    2. TP            DTensor plans on attention and MLP (sequence parallel, embeddings, head: not yet)
    3. EP            experts over ranks (part 2)
    4. CP            sequence over ranks (part 2)
    5. activation checkpointing
    6. compile       per block, GPU only
    7. FSDP2 / DDP   last: sharding wraps whatever the steps above produced (DTensor params, compiled blocks)

Why this order: TP must see plain nn.Linear modules before FSDP turns parameters into sharded DTensors; compile
must see the final block (checkpointed, TP-planned) but not FSDP's per-block hooks, which FSDP2 is built to sit
outside of; the pipeline split comes first so every later step only touches the blocks this rank holds.

Nothing here edits a model class or renames a parameter: blocks are found by name (every `layers` ModuleDict)
and changed in place, so checkpoints and parameter-name initialisation work for every layout.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from framework.config import ConfigError, Recipe
from framework.models.attention import Attention
from framework.models.mlp import FeedForward
from framework.parallel.dims import ParallelDims
from framework.parallel.pipeline import PipelineParts, split_for_pipeline
from framework.parallel.rng import fork_tp_dropout

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, recipe: Recipe) -> nn.Module:
    """Apply every step of the fixed order to `model` and return it. A run passes it on the meta device and
    initialises each rank's shards afterwards (framework/run.py build_parallel_model): no step may read values."""
    p = recipe.parallel
    apply_pipeline(model, dims, mesh, recipe)
    apply_tensor_parallel(model, dims, mesh)
    # EP and CP: ParallelDims refuses ep/cp > 1 until part 2 wires them here.
    apply_activation_checkpointing(model, p.activation_checkpointing)
    apply_compile(model, p.compile)
    apply_data_parallel(model, dims, mesh, recipe.precision.dtype, cpu_offload=p.cpu_offload)
    return model


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every transformer block: the children of each `layers` ModuleDict
    (decoder/encoder: `layers.N`; encoder-decoder: `encoder.layers.N`, `decoder.layers.N`)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleDict) and name.rsplit(".", 1)[-1] == "layers":
            found += [(f"{name}.{key}", block) for key, block in module.items()]
    return found


def apply_pipeline(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, recipe: Recipe) -> None:
    """Keep only this pipeline rank's blocks and modules (parameter names unchanged); its stage modules are
    recorded on the model (`pipeline_parts`) for the FSDP roots below and the pipeline engine."""
    if dims.pp > 1:
        model.pipeline_parts = split_for_pipeline(model, dims, recipe, mesh["pp"].get_local_rank())


def pipeline_parts(model: nn.Module) -> PipelineParts | None:
    """The stages `apply_pipeline` recorded, or None without pipeline parallelism."""
    return getattr(model, "pipeline_parts", None)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh) -> None:
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        # dropout on tp-sharded activations draws its own masks per tp rank (framework/parallel/rng.py)
        fork_tp_dropout(model, mesh["tp"], sequence_parallel=dims.sequence_parallel)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP of every attention and MLP (ParallelDims has refused what is not split yet).

    Column-parallel q/k/v and w1/w3 take the replicated activation and give each rank its own heads / hidden
    columns as plain local tensors, so the model code runs unchanged on fewer heads (it reads the local head count
    from the projection's output); row-parallel wo/w2 all-reduce the partial sums back to a replicated activation.
    Embeddings, norms and the head stay replicated: the all-reduces in backward hand them identical gradients."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            plan.update(_attention_plan(name, module, tp_mesh))
        elif isinstance(module, FeedForward):
            plan.update(_mlp_plan(name, module))
    parallelize_module(model, tp_mesh, plan)


def _attention_plan(name: str, attention: Attention, tp_mesh: DeviceMesh) -> dict[str, ParallelStyle]:
    # ALiBi slopes (and any per-head table) are indexed by global head: this rank holds heads
    # offset .. offset + n_heads / tp - 1 (ColwiseParallel gives rank r the r-th contiguous block of rows).
    attention.head_offset = tp_mesh.get_local_rank() * (attention.n_heads // tp_mesh.size())
    _shard_per_head_params(attention, tp_mesh)
    plan = {f"{name}.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")} | {f"{name}.wo": RowwiseParallel()}
    if attention.q_norm is not None:
        # QK-norm runs per head on [B, S, local heads, D]: its replicated weight sees only this rank's heads, so
        # its gradient is partial. SequenceParallel over the heads dim (2) makes the weight a Replicate DTensor
        # and the input Shard(2), so DTensor sums the weight's gradient over tp ranks; the forward is unchanged.
        plan |= {
            f"{name}.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
            for n in ("q_norm", "k_norm")
        }
    return plan


def _shard_per_head_params(attention: Attention, tp_mesh: DeviceMesh) -> None:
    """Learned per-head temperature / distance weights: Shard(0) over tp like the heads (contiguous blocks, as
    ColwiseParallel splits wq), so each rank trains its heads' entries; the module reads them through local_view.
    Re-registered under the same name so parameter names (checkpoints, init) do not change."""
    sharded = False
    for pname in ("log_temperature", "distance_weight"):
        param = getattr(attention, pname, None)
        if param is not None:
            attention.register_parameter(
                pname, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(0)]))
            )
            sharded = True
    if sharded:
        attention.local_view = _to_local


def _to_local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 hands the module its tp-sharded DTensor during forward; to_local keeps the gradient path.
    return t.to_local() if isinstance(t, DTensor) else t


def _mlp_plan(name: str, mlp: FeedForward) -> dict[str, ParallelStyle]:
    columns = ("w1", "w3") if mlp.w3 is not None else ("w1",)
    return {f"{name}.{w}": ColwiseParallel() for w in columns} | {f"{name}.w2": RowwiseParallel()}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """none; full: recompute every block in backward; selective: every other block (half the memory saving for
    half the recompute). The block's forward is wrapped on the instance rather than with checkpoint_wrapper,
    which would insert a `_checkpoint_wrapped_module` level into every parameter name."""
    if mode == "none":
        return
    for i, (_, block) in enumerate(blocks(model)):
        if mode == "full" or i % 2 == 0:
            # Non-reentrant checkpointing supports keyword arguments and works under FSDP2's hooks.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """torch.compile each block in place (nn.Module.compile keeps parameter names). GPU only: on CPU the compile
    time of a tiny test model dwarfs any gain and inductor needs a C++ toolchain, so it is skipped with a note."""
    if not enabled:
        return
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.warning("parallel.compile is set but the model is on %s: compile skipped (GPU only)", device.type)
        return
    for _, block in blocks(model):
        block.compile()


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """Parameters (and so matmuls) in the training dtype; gradients reduced and kept in fp32."""
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)


def apply_data_parallel(
    model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, dtype: str, *, cpu_offload: bool = False
) -> None:
    """DDP (replicate) over dp_replicate; FSDP2 over dp_shard; HSDP over (dp_replicate, dp_shard).
    Each block is its own FSDP unit (its parameters are gathered just before use and freed after), then the root
    takes what is left (embeddings, final norm, head). cpu_offload: the sharded parameters, their gradients and
    the optimizer step live in CPU memory (FSDP2's CPUOffloadPolicy)."""
    _check_cpu_offload(dims, cpu_offload)
    if dims.dp == 1:
        return
    if dims.data_parallel == "ddp":
        replicate(model, device_mesh=mesh["dp_replicate"])
        return
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.data_parallel == "hsdp" else mesh["dp_shard"]
    # Pinned host memory makes the copies asynchronous but needs an accelerator (pin_memory raises without one);
    # on a CPU-only machine the policy still runs FSDP2's offload path (the copies are then no-ops).
    offload = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if cpu_offload else OffloadPolicy()
    shard = functools.partial(
        fully_shard, mesh=dp_mesh, mp_policy=mixed_precision(dtype), offload_policy=offload
    )
    for _, block in blocks(model):
        shard(block)
    # A rank running two pipeline stages runs them as two modules: each must be an FSDP root of its own (the root
    # gathers the non-block parameters and drives the blocks' prefetch); otherwise the rank model is the root.
    parts = pipeline_parts(model)
    for root in parts.modules if parts is not None and len(parts.modules) > 1 else [model]:
        shard(root)


def _check_cpu_offload(dims: ParallelDims, cpu_offload: bool) -> None:
    if cpu_offload and (dims.data_parallel == "ddp" or dims.dp_shard == 1):
        raise ConfigError(
            None,
            "parallel.cpu_offload",
            True,
            "CPU offload moves FSDP2 shards to the host: it needs data_parallel fsdp or hsdp with dp_shard > 1 "
            f"(this layout: {dims.data_parallel}, dp_shard {dims.dp_shard})",
            "set data_parallel: fsdp (or hsdp with dp_shard > 1), or cpu_offload: false",
        )
