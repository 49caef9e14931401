"""What one forward keeps for backward under FSDP2, measured on every rank (run by test_memory_fsdp.py)."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from framework.config import DataConfig, ModelConfig, ParallelConfig, PrecisionConfig, Recipe, TrainConfig
from framework.engines.native import DistributedTrainModule
from framework.models.memory import activation_breakdown
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.parallelize import blocks
from framework.run import build_parallel_model, materialize_model
from framework.train.loss import compute_loss

BATCH, SEQ = 2, 20


def memory_recipe(world_size: int, n_layers: int = 4) -> Recipe:
    """A bf16 Llama-style decoder with widths that no activation shares with a weight matrix, FSDP2 over the
    world. Four blocks, so the two a rank gathers at once are not the whole model."""
    model = ModelConfig(
        vocab_size=101, d_model=48, n_layers=n_layers, n_heads=4, kv_heads=2, ffn_hidden=80, max_seq_len=SEQ
    )
    recipe = Recipe(
        model=model,
        data=DataConfig(seq_len=SEQ),
        train=TrainConfig(micro_batch_size=BATCH, global_batch_size=BATCH * world_size, device="cpu"),
        precision=PrecisionConfig(dtype="bf16"),
        parallel=ParallelConfig(data_parallel="fsdp"),
    )
    recipe.launch.nproc_per_node = world_size
    recipe.validate()
    return recipe


def _forward_keeps(model: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    """After one forward and the loss (before backward): the bytes of the distinct storages autograd saved that
    are still allocated (FSDP2 frees a gathered block's storage after its forward: it then holds 0 bytes), and how
    many saved tensors are live low-precision copies of a block's weight matrix (same shape, compute dtype)."""
    local = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for _, b in blocks(model) for p in b.parameters() if p.dim() == 2}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in local:
            saved.append(t)
        return t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, recipe.model.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, recipe.model.vocab_size, (BATCH, SEQ), generator=gen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        out = compute_loss(logits, labels, torch.tensor(labels.numel()), 0.0)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    copies = sum(
        t.untyped_storage().nbytes() > 0 and t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
        for t in saved
    )
    out.loss.backward()
    return {"saved_bytes": sum(storages.values()), "weight_copies": copies}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def fsdp_forward_keeps() -> dict[str, Any]:
    """This rank's measurement under FSDP2 over the world (Loom's parallelize), the one-process measurement of
    the same model, and the estimates of both layouts."""
    world = dist.get_world_size()
    recipe = memory_recipe(world)
    dims = ParallelDims.from_recipe(recipe, world)
    mesh = build_mesh(dims, "cpu")
    sharded = build_parallel_model(recipe, dims, mesh, torch.device("cpu"))
    one = memory_recipe(1)
    single = materialize_model(one.model, torch.device("cpu"), 0)
    return {
        "fsdp": _forward_keeps(sharded, recipe),
        "single": _forward_keeps(single, one),
        "fsdp_estimate": activation_breakdown(recipe),
        "single_estimate": activation_breakdown(one),
    }


def _live_fp32_bytes(exclude: set[int]) -> int:
    """Bytes of the distinct fp32 storages that live Python tensors hold, leaving out the storages in `exclude`:
    storage accounting from the garbage collector's view, independent of where FSDP2 keeps a gradient."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor) and obj.dtype == torch.float32:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude and storage.nbytes() > 0:
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def gradient_bytes_between_micro_batches(parallel: dict[str, Any]) -> dict[str, Any]:
    """fp32 bytes this rank holds after the first of two micro-batches' backward, beyond what it held before the
    step (its parameter shards): the gradients kept for the next micro-batch. With the model's fp32 size, the
    expected share (1/dp_shard under FSDP2 and HSDP) and the model's whole size."""
    world = dist.get_world_size()
    recipe = memory_recipe(world)
    for key, value in parallel.items():
        setattr(recipe.parallel, key, value)
    recipe.train.global_batch_size = 2 * BATCH * world // parallel.get("tp", 1)  # two micro-batches per rank
    dims = ParallelDims.from_recipe(recipe, world)
    mesh = build_mesh(dims, "cpu")
    module = DistributedTrainModule(
        build_parallel_model(recipe, dims, mesh, torch.device("cpu")), recipe, "cpu", dims, mesh
    )
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = [torch.randint(0, recipe.model.vocab_size, (BATCH, SEQ), generator=gen) for _ in range(2)]
    micro = [{"input_ids": i, "labels": i.clone()} for i in ids]
    baseline = _live_fp32_bytes(set())
    held: list[int] = []
    backward = module._backward

    def measured(loss: torch.Tensor, last: bool) -> None:
        backward(loss, last)
        if not last:
            held.append(_live_fp32_bytes(set()) - baseline)

    module._backward = measured
    module.train_batch(micro)
    model_bytes = (
        sum(p.numel() for p in materialize_model(recipe.model, torch.device("meta"), 0).parameters()) * 4
    )
    return {"held": held[0], "model_bytes": model_bytes, "dp_shard": dims.dp_shard}


def long_sequence_recipe(seq: int, cp: int) -> Recipe:
    """A tiny fp32 decoder at sequence length `seq`, ring attention over `cp` ranks (cp 1: one process)."""
    model = ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, kv_heads=2, ffn_hidden=64, max_seq_len=seq
    )
    recipe = Recipe(
        model=model,
        data=DataConfig(seq_len=seq),
        train=TrainConfig(micro_batch_size=1, global_batch_size=1, device="cpu"),
        parallel=ParallelConfig(data_parallel="ddp", cp=cp, cp_ring=cp),  # no gathered weight copies
    )
    recipe.launch.nproc_per_node = cp
    recipe.validate()
    return recipe


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saved in one forward and loss, parameters left out."""
    params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compute_loss(model(**batch), labels, torch.tensor(labels.numel()), 0.0)
    out.loss.backward()
    return sum(storages.values())


def ring_forward_keeps(seq: int) -> dict[str, Any]:
    """What one forward at sequence length `seq` keeps on this rank under ring cp = world, and (rank 0) on one
    process, with the estimates of both (framework/models/memory.py)."""
    from framework.parallel.context import shard_batch

    world = dist.get_world_size()
    recipe = long_sequence_recipe(seq, world)
    dims = ParallelDims.from_recipe(recipe, world)
    mesh = build_mesh(dims, "cpu")
    model = build_parallel_model(recipe, dims, mesh, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 64, (2, 1, seq), generator=gen)
    # copies: a shard is a view of the whole batch's storage, which saved_bytes would count
    mine = {
        k: t.clone() for k, t in shard_batch({"input_ids": ids, "labels": labels}, mesh["cp"], dims).items()
    }
    result: dict[str, Any] = {"ring": _saved_bytes(model, {k: mine[k] for k in ("input_ids", "positions")},
                                                   mine["labels"])}  # fmt: skip
    result["ring_estimate"] = sum(activation_breakdown(recipe).values())
    if dist.get_rank() == 0:
        one = long_sequence_recipe(seq, 1)
        single = materialize_model(one.model, torch.device("cpu"), 0)
        result["single"] = _saved_bytes(single, {"input_ids": ids}, labels)
        result["single_estimate"] = sum(activation_breakdown(one).values())
    dist.barrier()
    return result
