"""Tensor parallelism (Megatron-LM) with optional sequence parallelism (Korthikanti et al. 2022), as DTensor plans.

Layout over the tp mesh dimension, per transformer block:

    attention      wq/wk/wv column-parallel (each rank its contiguous block of heads), wo row-parallel
    MLA            wq or wq_b, and wkv_b column-parallel (heads), wo row-parallel; the down projections wq_a /
                   wkv_a and the latent norms replicated, the shared rope key's gradient summed over tp
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

A tied head (`model.tie_embeddings`) is F.linear(h, tok_embeddings.weight, output_bias) inside the model's forward.
The shared weight is the vocab-sharded embedding's, `output_bias` is sharded the same way, and the module that
produces h hands it on as a Replicate DTensor (PrepareModuleOutput), so DTensor computes the product as a
column-parallel matmul: logits sharded over the vocabulary, h's gradient all-reduced, and the weight's gradient the
sum of its (row-sharded) embedding and head parts. The embedding's gradient is kept in the weight's row shards
(`_keep_weight_grad_sharded`: DTensor would leave a whole [V, D] gradient on every rank).

Sequence parallelism (`parallel.sequence_parallel`) shards the residual stream along the sequence *inside each
stack*: the stack's input (embeddings) stays replicated, so positions, the T5 bias and the decoder's second
embedding call see the whole sequence; its first block takes its sequence shard locally (no communication), the
norms run on shards (SequenceParallel: Replicate weights whose gradients are summed over tp), attention and MLP
all-gather their input (PrepareModuleInput) and reduce-scatter their output (row-parallel to Shard(1)), MoE layers
gather their input and keep their output's shard, and the stack's last block all-gathers, so the final norm, head,
encoder memory (cross-attention keys/values) and pipeline stage outputs are whole sequences again. Pipeline stages
are stacks of their own here: each stage starts and ends replicated, and so is each multi-token prediction depth's
block (its eh_proj, norms and the shared head see whole sequences). The MTP blocks' attention and MLP take the same
plans as the main stack's (found by module type and name).
"""

from __future__ import annotations

import contextlib
import functools

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
from framework.models.mla import MLA
from framework.models.mlp import FeedForward
from framework.models.moe import MoE
from framework.models.positions import RelativePositionBias
from framework.models.recurrence import RecurrentMixer
from framework.parallel.dims import ParallelDims
from framework.parallel.recurrent import recurrent_tp_plan, sum_gradient

SEQ = Shard(1)
"""Sequence dimension of [B, S, D] activations."""


def vocab_parallel(dims: ParallelDims, recipe: Recipe) -> bool:
    """Whether the embedding and head are split over the vocabulary (and the loss runs under loss_parallel): every
    layout with tp > 1, tied heads included. `recipe` is part of the signature for rules that depend on the model."""
    return dims.tp > 1


def loss_context(dims: ParallelDims, recipe: Recipe) -> contextlib.AbstractContextManager:
    """The context the loss's forward AND backward must run in: torch's loss_parallel when the logits are sharded
    over the vocabulary (its cross-entropy ops are swapped in while it is active, the backward included). Enter it
    once: torch's context is not reentrant (an inner exit removes the ops the outer one still needs) and, being a
    plain generator, leaves them installed if the body raises."""
    return loss_parallel() if vocab_parallel(dims, recipe) else contextlib.nullcontext()


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, vocab: bool) -> None:
    """Lay `model` out over `tp_mesh` (see the module docstring). `vocab`: split embedding and head."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            plan |= _mla_plan(name, module, tp_mesh, sequence_parallel)
        elif isinstance(module, Attention):
            plan |= _attention_plan(name, module, tp_mesh, sequence_parallel)
        elif isinstance(module, RecurrentMixer):
            plan |= recurrent_tp_plan(name, module, tp_mesh, sequence_parallel, SEQ)
        elif isinstance(module, RelativePositionBias):
            _shard_heads(module, ("weight",), 1, tp_mesh)
        elif name.rsplit(".", 1)[-1] == "feed_forward":
            plan |= _feed_forward_plan(name, module, sequence_parallel)
        elif sequence_parallel and name.endswith(("attention_norm", ".ffn_norm", "_post_norm")):
            # Per-token norms on the local sequence shard (the sandwich norms of Gemma 2 on the branch outputs'
            # reduce-scattered shards); their Replicate weights get summed gradients.
            plan[name] = SequenceParallel(use_local_output=True)
    if vocab:
        plan |= _vocab_plan(model)
    parallelize_module(model, tp_mesh, plan)
    embeddings = getattr(model, "tok_embeddings", None)
    if vocab and embeddings is not None:
        embeddings.register_forward_pre_hook(_keep_weight_grad_sharded)
    if sequence_parallel:
        for stack in _stacks(model):
            _shard_sequence_inside(list(stack.values()), tp_mesh)
        for layer in getattr(model, "mtp", None) or ():
            _shard_sequence_inside([layer.block], tp_mesh)  # an MTP depth's block is a stack of its own
    if vocab and model.cfg.tie_embeddings:
        _tie_vocab_parallel(model, tp_mesh)  # after the stack boundaries: its hook must run last


def _attention_plan(
    name: str, attention: Attention, tp_mesh: DeviceMesh, sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    # ALiBi slopes (and any per-head table) are indexed by global head: this rank holds heads
    # offset .. offset + n_heads / tp - 1 (ColwiseParallel gives rank r the r-th contiguous block of rows).
    attention.head_offset = tp_mesh.get_local_rank() * (attention.n_heads // tp_mesh.size())
    _shard_heads(attention, ("log_temperature", "distance_weight", "sinks"), 0, tp_mesh)
    columns = ("wq", "wk", "wv") + (("wg",) if hasattr(attention, "wg") else ())  # gate: per head, as wq
    plan: dict[str, ParallelStyle] = {f"{name}.{w}": ColwiseParallel() for w in columns}
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


def _mla_plan(name: str, mla: MLA, tp_mesh: DeviceMesh, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """MLA by heads: the up projections (wq, or wq_b after the replicated wq_a and q_norm; wkv_b after the
    replicated wkv_a and kv_norm) column-parallel, wo row-parallel. The replicated down projections see every
    head's gradient: the latents reach wkv_b / wq_b through ColwiseParallel, whose input gradient is all-reduced,
    and the shared rope key, which each rank's heads use directly, sums its gradient over tp (`shared_view`). So
    the block input's gradient is whole on every rank, and with sequence parallelism the input is gathered into a
    plain tensor whose gradient is then already summed (its Shard(1) slice is taken, no reduce-scatter)."""
    mla.head_offset = tp_mesh.get_local_rank() * (mla.n_heads // tp_mesh.size())
    mla.shared_view = functools.partial(sum_gradient, group=tp_mesh.get_group())
    columns = [w for w in ("wq", "wq_b", "wkv_b") if hasattr(mla, w)]
    plan: dict[str, ParallelStyle] = {f"{name}.{w}": ColwiseParallel() for w in columns}
    plan[f"{name}.wo"] = RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate())
    if sequence_parallel:
        plan[name] = PrepareModuleInput(
            input_layouts=(SEQ, None), desired_input_layouts=(Replicate(), None), use_local_output=True
        )
    return plan


def _shard_heads(module: nn.Module, names: tuple[str, ...], dim: int, tp_mesh: DeviceMesh) -> None:
    """Per-head parameters (attention temperature / distance weights: dim 0; the T5 bias table [buckets, heads]:
    dim 1) sharded like the heads (contiguous blocks, as ColwiseParallel splits wq), so each rank trains its
    heads' entries and the module reads them through `local_view`."""
    if _shard(module, names, dim, tp_mesh):
        module.local_view = _to_local


def _shard(module: nn.Module, names: tuple[str, ...], dim: int, tp_mesh: DeviceMesh) -> bool:
    """Shard(dim) the named parameters that exist; re-registered under the same name so parameter names
    (checkpoints, init) do not change. Whether any was sharded."""
    found = [n for n in names if getattr(module, n, None) is not None]
    for pname in found:
        param = getattr(module, pname)
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param.data, tp_mesh, [Shard(dim)])))
    return bool(found)


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


def _tie_vocab_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """A tied head on the vocab-sharded embedding weight (see the module docstring): shard `output_bias` like the
    weight's rows and make the head's input a Replicate DTensor. Ranks without the head (an earlier pipeline
    stage) have neither."""
    _shard(model, ("output_bias",), 0, tp_mesh)  # added to the sharded logits as a DTensor
    producer = _head_input(model)
    if producer is not None:
        # from_local(Replicate): h's gradient, partial over the vocabulary shards, is all-reduced in backward
        replicated = {"output_layouts": Replicate(), "desired_output_layouts": Replicate()}
        parallelize_module(producer, tp_mesh, PrepareModuleOutput(**replicated, use_local_output=False))


def _head_input(model: nn.Module) -> nn.Module | None:
    """The module whose output the tied head projects (framework/models/transformer.py lm_head)."""
    for name in (
        "head_transform",
        "decoder",
        "norm",
    ):  # BERT's transform; T5's decoder stack; pre-norm stacks
        module = getattr(model, name, None)
        if module is not None:
            return module
    layers = getattr(model, "layers", None)  # post-norm: the last block itself, if this rank holds it
    last = str(model.cfg.n_layers - 1)
    return layers[last] if layers is not None and last in layers else None


def _keep_weight_grad_sharded(module: nn.Module, args: tuple) -> None:
    """Keep the vocab-parallel embedding's gradient in the weight's own placements (Shard(0)). DTensor computes
    its backward (embedding_dense_backward from replicated indices and output gradient) as a whole [V, D]
    Replicate gradient on every rank, without communication; slicing it to this rank's rows is local too. Without
    this, every rank would keep a full-vocabulary gradient, and a pipeline's two copies of a tied weight (embedding
    on the first stage, head on the last) would hold gradients of different shapes. Registered at forward time on
    whatever parameter the module holds then (materialisation and FSDP2 replace the parameter objects), once."""
    weight = module.weight
    if not weight.requires_grad or getattr(weight, "_grad_kept_sharded", False):
        return
    mesh, placements = weight.device_mesh, weight.placements

    def to_param_layout(grad: torch.Tensor) -> torch.Tensor:
        if isinstance(grad, DTensor) and grad.placements != placements:
            return grad.redistribute(mesh, placements)
        return grad

    weight.register_hook(to_param_layout)
    weight._grad_kept_sharded = True


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


def _shard_sequence_inside(blocks: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """The stack's first block takes its sequence shard of the replicated input (a local slice; its backward
    all-gathers the gradient); the last block all-gathers its output. A block is called as
    block(x, ctx, memory, memory_ctx): only x changes layout."""
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
