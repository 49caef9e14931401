"""Tensor parallelism (Megatron-LM) with optional sequence parallelism (Korthikanti et al. 2022), as DTensor plans.

Layout over the tp mesh dimension, per transformer block:

    attention      wq/wk/wv column-parallel (each rank its contiguous block of heads), wo row-parallel
    MLP            w1/w3 column-parallel, w2 row-parallel
    MoE            replicated (experts are split by expert parallelism, not tp); identical work on every tp rank
    per-head       ALiBi slopes by global head (`head_offset`); learned temperature / distance weights and the T5
                   relative-bias table sharded over heads, read through the modules' `local_view` hooks
    QK-norm        weight Replicate, input Shard(heads): its gradient is summed over tp ranks

Whole model: the token embedding is vocab-parallel (rows sharded, masked lookup, all-reduce) and the output head is
column-parallel with its logits left sharded over the vocabulary: the loss runs under torch's `loss_parallel`, so
the [B, S, V] logits are never gathered (see `loss_context` and framework/train/loss.py). Position and type
embeddings, embed_norm, head_transform and the final norm stay replicated: their inputs are replicated and the
gradients reaching them are identical on every tp rank (the backward all-reduces of the TP regions).

A tied head (`model.tie_embeddings`) keeps the embedding and head replicated, with full logits: the model computes
it as F.linear(h, tok_embeddings.weight) inside its forward, where a vocab-sharded weight would meet a plain
activation. Correct, but without the vocabulary split of memory and compute.

Sequence parallelism (`parallel.sequence_parallel`) shards the residual stream along the sequence *inside each
stack*: the stack's input (embeddings) stays replicated, so positions, the T5 bias and the decoder's second
embedding call see the whole sequence; its first block takes its sequence shard locally (no communication), the
norms run on shards (SequenceParallel: Replicate weights whose gradients are summed over tp), attention and MLP
all-gather their input (PrepareModuleInput) and reduce-scatter their output (row-parallel to Shard(1)), MoE layers
gather their input and keep their output's shard, and the stack's last block all-gathers, so the final norm, head,
encoder memory (cross-attention keys/values) and pipeline stage outputs are whole sequences again. Pipeline stages
are stacks of their own here: each stage starts and ends replicated.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from framework.config import Recipe
from framework.models.attention import Attention
from framework.models.mlp import FeedForward
from framework.models.moe import MoE
from framework.models.positions import RelativePositionBias
from framework.parallel.dims import ParallelDims

SEQ = Shard(1)
"""Sequence dimension of [B, S, D] activations."""


def vocab_parallel(dims: ParallelDims, recipe: Recipe) -> bool:
    """Whether the embedding and head are split over the vocabulary (and the loss runs under loss_parallel)."""
    return dims.tp > 1 and not recipe.model.tie_embeddings


def loss_context(dims: ParallelDims, recipe: Recipe) -> contextlib.AbstractContextManager:
    """The context the loss's forward AND backward must run in: torch's loss_parallel when the logits are sharded
    over the vocabulary (its cross-entropy ops are swapped in while it is active, the backward included)."""
    return loss_parallel() if vocab_parallel(dims, recipe) else contextlib.nullcontext()


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, vocab: bool) -> None:
    """Lay `model` out over `tp_mesh` (see the module docstring). `vocab`: split embedding and head."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            plan |= _attention_plan(name, module, tp_mesh, sequence_parallel)
        elif isinstance(module, RelativePositionBias):
            _shard_heads(module, ("weight",), 1, tp_mesh)
        elif name.rsplit(".", 1)[-1] == "feed_forward":
            plan |= _feed_forward_plan(name, module, sequence_parallel)
        elif sequence_parallel and name.endswith(("attention_norm", ".ffn_norm")):
            # Per-token norms on the local sequence shard; their Replicate weights get summed gradients.
            plan[name] = SequenceParallel(use_local_output=True)
    if vocab:
        plan |= _vocab_plan(model)
    parallelize_module(model, tp_mesh, plan)
    if sequence_parallel:
        for stack in _stacks(model):
            _shard_sequence_inside(stack, tp_mesh)


def _attention_plan(
    name: str, attention: Attention, tp_mesh: DeviceMesh, sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    # ALiBi slopes (and any per-head table) are indexed by global head: this rank holds heads
    # offset .. offset + n_heads / tp - 1 (ColwiseParallel gives rank r the r-th contiguous block of rows).
    attention.head_offset = tp_mesh.get_local_rank() * (attention.n_heads // tp_mesh.size())
    _shard_heads(attention, ("log_temperature", "distance_weight"), 0, tp_mesh)
    plan: dict[str, ParallelStyle] = {f"{name}.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
    plan[f"{name}.wo"] = RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate())
    if sequence_parallel:
        # Gather the sequence once per attention; kept a DTensor so the q/k/v input gradients add up as partial
        # sums and leave by one reduce-scatter. Cross-attention's memory (arg 3) is already whole (see docstring).
        n_args = 3 if name.rsplit(".", 1)[-1] == "cross_attention" else 2
        plan[name] = PrepareModuleInput(
            input_layouts=(SEQ,) + (None,) * (n_args - 1),
            desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
        )
    if attention.q_norm is not None:
        # QK-norm runs per head on [B, S, local heads, D]: its replicated weight sees only this rank's heads, so
        # its gradient is partial. SequenceParallel over the heads dim (2) makes the weight a Replicate DTensor
        # and the input Shard(2), so DTensor sums the weight's gradient over tp ranks; the forward is unchanged.
        plan |= {
            f"{name}.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
            for n in ("q_norm", "k_norm")
        }
    return plan


def _shard_heads(module: nn.Module, names: tuple[str, ...], dim: int, tp_mesh: DeviceMesh) -> None:
    """Per-head parameters (attention temperature / distance weights: dim 0; the T5 bias table [buckets, heads]:
    dim 1) sharded like the heads (contiguous blocks, as ColwiseParallel splits wq), so each rank trains its
    heads' entries and the module reads them through `local_view`. Re-registered under the same name so
    parameter names (checkpoints, init) do not change."""
    sharded = False
    for pname in names:
        param = getattr(module, pname, None)
        if param is not None:
            module.register_parameter(
                pname, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(dim)]))
            )
            sharded = True
    if sharded:
        module.local_view = _to_local


def _to_local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 hands the module its tp-sharded DTensor during forward; to_local keeps the gradient path.
    return t.to_local() if isinstance(t, DTensor) else t


def _feed_forward_plan(name: str, ffn: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if isinstance(ffn, MoE):
        if not sequence_parallel:
            return {}  # replicated input, replicated experts: every tp rank computes the same (full) gradients
        # Router statistics, capacity and the balancing losses are per sequence: run the layer on the whole
        # sequence (identical on every tp rank) and keep this rank's shard of the output. Backward: the shards'
        # gradients are all-gathered, so every rank's (replicated) experts get the full gradient.
        return {
            name: PrepareModuleInputOutput(
                input_layouts=(SEQ,),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(SEQ,),
            )
        }
    if not isinstance(ffn, FeedForward):
        return {}
    columns = ("w1", "w3") if ffn.w3 is not None else ("w1",)
    plan: dict[str, ParallelStyle] = {f"{name}.{w}": ColwiseParallel() for w in columns}
    plan[f"{name}.w2"] = RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate())
    if sequence_parallel:
        plan[name] = PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),))
    return plan


def _vocab_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Vocab-parallel token embedding (rows sharded; the masked lookup's partial sums all-reduced) and a
    column-parallel head whose logits stay a DTensor sharded over the vocabulary, for loss_parallel."""
    plan: dict[str, ParallelStyle] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if getattr(model, "output", None) is not None:
        plan["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def _stacks(model: nn.Module) -> list[nn.ModuleDict]:
    """Every `layers` ModuleDict of every pipeline stage this rank runs (one stage: the model itself)."""
    parts = getattr(model, "pipeline_parts", None)
    stages = parts.modules if parts is not None else [model]
    return [
        module
        for stage in stages
        for name, module in stage.named_modules()
        if isinstance(module, nn.ModuleDict) and name.rsplit(".", 1)[-1] == "layers" and len(module)
    ]


def _shard_sequence_inside(layers: nn.ModuleDict, tp_mesh: DeviceMesh) -> None:
    """The stack's first block takes its sequence shard of the replicated input (a local slice; its backward
    all-gathers the gradient); the last block all-gathers its output. A block is called as
    block(x, ctx, memory, memory_ctx): only x changes layout."""
    blocks = list(layers.values())
    first = {
        "input_layouts": (Replicate(), None, None, None),
        "desired_input_layouts": (SEQ, None, None, None),
    }
    last = {"output_layouts": SEQ, "desired_output_layouts": Replicate()}
    if len(blocks) == 1:
        parallelize_module(
            blocks[0], tp_mesh, PrepareModuleInputOutput(**first, use_local_input=True, **last)
        )
        return
    parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(**first, use_local_output=True))
    parallelize_module(blocks[-1], tp_mesh, PrepareModuleOutput(**last, use_local_output=True))
