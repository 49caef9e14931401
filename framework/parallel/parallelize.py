"""Lay a built model out over a DeviceMesh, in one fixed order.

    0. FP8           precision.dtype fp8: the chosen nn.Linear layers become Float8Linear / te.Linear
                     (framework/kernels/fp8.py) on the whole model, before anything below reads module types
    1. PP split      stages keep the full model's parameter names (delete what a stage does not own)
    2. TP / SP       DTensor plans: attention, MLP, vocab-parallel embedding and head, sequence-parallel norms
    3. EP            experts split over the ep ranks, tokens exchanged all-to-all (framework/parallel/expert.py)
    4. CP            sequence over ranks: Ulysses all-to-all around each attention (framework/parallel/context.py)
    5. activation checkpointing
    6. compile       per block, on the run's device (CPU included) when parallel.compile is set
    7. FSDP2 / DDP   last: sharding wraps whatever the steps above produced (DTensor params, compiled blocks);
                     over the data-parallel ranks x cp (cp ranks' gradients are partial sums)

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
from torch.utils.checkpoint import checkpoint

from framework.config import Recipe
from framework.kernels.fp8 import COMPUTE_DTYPES, apply_fp8
from framework.parallel.context import apply_context_parallel, data_parallel_mesh
from framework.parallel.dims import ParallelDims, expert_meshes
from framework.parallel.expert import apply_expert_parallel, expert_modules
from framework.parallel.pipeline import PipelineParts, split_for_pipeline
from framework.parallel.rng import fork_tp_dropout
from framework.parallel.tensor import apply_tp, vocab_parallel

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, recipe: Recipe) -> nn.Module:
    """Apply every step of the fixed order to `model` and return it. A run passes it on the meta device and
    initialises each rank's shards afterwards (framework/run.py build_parallel_model): no step may read values."""
    p = recipe.parallel
    # fp8 first: its first/last-block choice needs the whole model, and TP / FSDP2 then lay out Float8Linear
    # modules (nn.Linear subclasses with plain weights) like any Linear (as torchtitan converts before it
    # parallelizes).
    apply_fp8(model, recipe.precision, mesh.device_type)
    apply_pipeline(model, dims, mesh, recipe)
    apply_tensor_parallel(model, dims, mesh, recipe)
    experts = expert_meshes(mesh, dims)  # None without expert parallelism
    if experts is not None:
        apply_expert_parallel(model, experts.ep)
    apply_context_parallel(model, dims, mesh["cp"])
    apply_activation_checkpointing(model, p.activation_checkpointing)
    apply_compile(model, p.compile, mesh.device_type)
    apply_data_parallel(
        model,
        dims,
        mesh,
        recipe.precision.resolved_dtype(mesh.device_type),
        cpu_offload=p.cpu_offload,
        expert_dp=None if experts is None else experts.dp,
    )
    return model


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every transformer block: the children of each `layers` ModuleDict
    (decoder/encoder: `layers.N`; encoder-decoder: `encoder.layers.N`, `decoder.layers.N`), then the multi-token
    prediction depths' blocks (`mtp.K.block`), which activation checkpointing, compile and FSDP treat alike."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleDict) and name.rsplit(".", 1)[-1] == "layers":
            found += [(f"{name}.{key}", block) for key, block in module.items()]
    return found + [(f"{name}.block", layer.block) for name, layer in mtp_layers(model)]


def mtp_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the multi-token prediction depths this rank holds (`mtp.K`; none without)."""
    mtp = getattr(model, "mtp", None)
    return [(f"mtp.{key}", layer) for key, layer in mtp.named_children()] if mtp is not None else []


def apply_pipeline(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, recipe: Recipe) -> None:
    """Keep only this pipeline rank's blocks and modules (parameter names unchanged); its stage modules are
    recorded on the model (`pipeline_parts`) for the FSDP roots below and the pipeline engine."""
    if dims.pp > 1:
        model.pipeline_parts = split_for_pipeline(model, dims, recipe, mesh["pp"].get_local_rank())


def pipeline_parts(model: nn.Module) -> PipelineParts | None:
    """The stages `apply_pipeline` recorded, or None without pipeline parallelism."""
    return getattr(model, "pipeline_parts", None)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, recipe: Recipe) -> None:
    """TP (+ sequence parallel, vocab-parallel embedding and head): framework/parallel/tensor.py."""
    if dims.tp > 1:
        vocab = vocab_parallel(dims, recipe)
        apply_tp(model, mesh["tp"], sequence_parallel=dims.sequence_parallel, vocab=vocab)
        # dropout on tp-sharded activations draws its own masks per tp rank (framework/parallel/rng.py)
        fork_tp_dropout(model, mesh["tp"], sequence_parallel=dims.sequence_parallel)


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


def apply_compile(model: nn.Module, enabled: bool, device_type: str) -> None:
    """torch.compile each block in place (nn.Module.compile keeps parameter names), on whatever device the run
    targets when asked. `device_type` is the run's (the mesh's), never read from the model: `parallelize` gets
    it on the meta device. Compilation is lazy, at a block's first call. On CPU inductor's C++ backend compiles
    it (a C++ compiler is needed, and the first steps are slow): said once, since a CPU run rarely gains."""
    if not enabled:
        return
    if device_type == "cpu":
        log.info(
            "parallel.compile on CPU: inductor compiles each block at the first step (needs a C++ compiler)"
        )
    for _, block in blocks(model):
        block.compile()


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """Parameters (and so matmuls) in the training dtype; gradients reduced and kept in fp32."""
    return MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[dtype], reduce_dtype=torch.float32)


def apply_data_parallel(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    dtype: str,
    *,
    cpu_offload: bool = False,
    expert_dp: DeviceMesh | None = None,
) -> None:
    """DDP (replicate) over dp_replicate; FSDP2 over dp_shard; HSDP over (dp_replicate, dp_shard); each with cp
    folded in (context.data_parallel_mesh), so pure context parallelism gets FSDP2/DDP over cp.
    Each block is its own FSDP unit (its parameters are gathered just before use and freed after), then the root
    takes what is left (embeddings, final norm, head). cpu_offload: the sharded parameters, their gradients and
    the optimizer step live in CPU memory (FSDP2's CPUOffloadPolicy). With expert parallelism (`expert_dp`, the
    experts' data-parallel mesh) each MoE layer's experts are a unit of their own over that mesh, sharded first
    so the block's unit leaves them alone (their ep ranks are part of dp_shard: the block's mesh would overlap).
    Each multi-token prediction depth (`mtp.K`) is a unit around its block's."""
    if dims.dp * dims.cp == 1:
        return
    dp_mesh = data_parallel_mesh(mesh, dims)
    if dims.data_parallel == "ddp":
        replicate(model, device_mesh=dp_mesh)
        return
    # Pinned host memory makes the copies asynchronous but needs an accelerator (pin_memory raises without one);
    # on a CPU-only machine the policy still runs FSDP2's offload path (the copies are then no-ops).
    offload = (
        CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if cpu_offload else OffloadPolicy()
    )
    shard = functools.partial(
        fully_shard, mesh=dp_mesh, mp_policy=mixed_precision(dtype), offload_policy=offload
    )
    for experts in expert_modules(model) if expert_dp is not None else []:
        shard(experts, mesh=expert_dp)
    for _, block in blocks(model):
        shard(block)
    for _, layer in mtp_layers(model):
        shard(layer)  # an MTP depth's norms and eh_proj (2d x d) are gathered with it, not kept by the root
    # A rank running two pipeline stages runs them as two modules: each must be an FSDP root of its own (the root
    # gathers the non-block parameters and drives the blocks' prefetch); otherwise the rank model is the root.
    parts = pipeline_parts(model)
    for root in parts.modules if parts is not None and len(parts.modules) > 1 else [model]:
        shard(root)
