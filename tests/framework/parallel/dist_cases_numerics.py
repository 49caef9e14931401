"""Distributed numerics cases run on every rank of a `DistPool` ('dist_cases_numerics:name'): dropout RNG, the
non-finite skip, fp16 loss scaling, activation checkpointing, HSDP and the encoder families."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_cases import GLOBAL_BATCH, SEQ, VOCAB, full_params, global_batches, tiny_recipe
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from framework.config import Recipe
from framework.engines.native import DistributedTrainModule
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.parallelize import apply_activation_checkpointing, parallelize
from framework.run import build_parallel_model, materialize_model
from framework.train.train_module import Batch, TrainModule

# -- helpers ----------------------------------------------------------------------------------------------------


def build(recipe: Recipe, meta: bool = False) -> DistributedTrainModule:
    """This rank's module for `recipe`, initialised from the seed like every layout; `meta`: the way `loom train`
    builds it (parallelized on the meta device, then each rank's shards allocated and initialised)."""
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    if meta:
        model = build_parallel_model(recipe, dims, mesh, torch.device("cpu"))
    else:
        model = parallelize(materialize_model(recipe.model, torch.device("cpu"), 0), dims, mesh, recipe)
    return DistributedTrainModule(model, recipe, "cpu", dims, mesh)


def reference(recipe: Recipe) -> TrainModule:
    return TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")


def coords(module: DistributedTrainModule) -> dict[str, int]:
    mesh = module.mesh
    dp = mesh["dp_replicate"].get_local_rank() * module.dims.dp_shard + mesh["dp_shard"].get_local_rank()
    return {"rank": dist.get_rank(), "dp": dp, "tp": mesh["tp"].get_local_rank()}


def rank_slice(module: DistributedTrainModule, batch: list[Batch]) -> list[Batch]:
    per_rank = len(batch) // module.dims.dp
    dp = coords(module)["dp"]
    return batch[dp * per_rank : (dp + 1) * per_rank]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_params(module: TrainModule) -> dict[str, torch.Tensor]:
    """This rank's own storage of every parameter (bitwise comparisons of what the optimizer touched)."""
    return {n: local(p).detach().clone() for n, p in module.model.named_parameters()}


def inject(module: TrainModule, name: str, value: float) -> None:
    """Write `value` into the first element this rank holds of parameter `name`'s gradient."""
    grad = local(dict(module.model.named_parameters())[name].grad)
    grad.view(-1)[0] = value


def rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def param_rel(module: TrainModule, ref: TrainModule) -> float:
    """Largest ||a - b|| / ||b|| over parameters. The key bias (BERT-like `bias: true`) is left out: its gradient
    is zero in exact arithmetic (softmax ignores a constant added to all of a query's scores), so what each layout
    computes is rounding noise, which AdamW normalises into full-size steps of either sign (measured: 1.09)."""
    ours, theirs = full_params(module.model), full_params(ref.model)
    return max(
        ((ours[n] - p).norm() / p.norm()).item() for n, p in theirs.items() if not n.endswith("wk.bias")
    )


# -- 1. dropout RNG -------------------------------------------------------------------------------------------


class DropoutMasks(TorchFunctionMode):
    """Records every F.dropout call as (kind, mask of dropped elements among the non-zero inputs, kept inputs).
    4-D inputs are attention probabilities (this rank's heads); 3-D ones are [B, S, D] activations (S is this
    rank's sequence shard under sequence parallelism)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch protocol)
        out = func(*args, **(kwargs or {}))
        if func is F.dropout:
            x = args[0]
            kind = "attention" if x.dim() == 4 else f"activation of {x.shape[1]} tokens"
            self.calls.append((kind, (out == 0) & (x != 0), x != 0))
        return out


def dropout_masks(parallel: dict[str, Any], p: float) -> dict[str, Any]:
    """One training forward of a model with embedding/residual and attention dropout `p` (naive attention so the
    attention dropout is an F.dropout call), the same input on every rank, generators seeded as a run seeds them
    (module.rng_seed). Returns this rank's coordinates and masks."""
    recipe = tiny_recipe({"dropout": p, "attention_dropout": p, "attention_backend": "naive"}, **parallel)
    module = build(recipe)
    torch.manual_seed(module.rng_seed)
    batch = global_batches(1)[0][0]
    module.model.train()
    with DropoutMasks() as recorder:
        module.model(batch["input_ids"])
    return {**coords(module), "calls": recorder.calls, "seed": module.rng_seed}


def dropout_checkpoint_grads(parallel: dict[str, Any], p: float) -> float:
    """Largest gradient difference between activation checkpointing none and full with dropout on: recompute must
    redraw the same masks (the per-tp-rank attention stream included)."""
    grads = []
    for ac in ("none", "full"):
        recipe = tiny_recipe({"dropout": p, "attention_dropout": p}, activation_checkpointing=ac, **parallel)
        module = build(recipe)
        torch.manual_seed(module.rng_seed)
        module.train_batch(rank_slice(module, global_batches(1)[0]))
        grads.append({n: local(q.grad).clone() for n, q in module.model.named_parameters()})
    return max((grads[0][n] - g).abs().max().item() for n, g in grads[1].items())


# -- 2. non-finite skip ---------------------------------------------------------------------------------------


def nonfinite_skip(
    parallel: dict[str, Any], param: str, value: float, bad_step: int = 1, steps: int = 3
) -> dict[str, Any]:
    """Train `steps` steps; at `bad_step` write `value` (NaN/inf) into ONE rank's (rank 1's) gradient of `param`.
    The reference is one process with the same value in the same gradient at the same step."""
    recipe = tiny_recipe(None, **parallel)
    batches = global_batches(steps)
    ref, module = reference(recipe), build(recipe)
    out: dict[str, Any] = {**coords(module), "skipped": [], "ref_skipped": [], "losses": [], "ref_losses": []}
    for step, batch in enumerate(batches):
        poison = (
            step == bad_step and param == "input"
        )  # `value` in the embedding output of rank 1's first sample
        with (
            _poisoned_embedding(ref, value, poison),
            _poisoned_embedding(module, value, poison and _rank() == 1),
        ):
            ref.train_batch(batch)
            module.train_batch(rank_slice(module, batch))
        before = local_params(module)
        if step == bad_step and param != "input":
            inject(ref, param, value)
            if dist.get_rank() == 1:
                inject(module, param, value)
        ref_stats, stats = ref.optim_step(), module.optim_step()
        out["skipped"].append(stats["skipped"])
        out["ref_skipped"].append(ref_stats["skipped"])
        out["losses"].append(stats["loss"])
        out["ref_losses"].append(ref_stats["loss"])
        if step == bad_step:
            after = local_params(module)
            out["unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    out["loss_rel"] = rel(out["losses"], out["ref_losses"])
    out["param_rel"] = param_rel(module, ref)
    return out


def _rank() -> int:
    return dist.get_rank()


@contextlib.contextmanager
def _poisoned_embedding(module: TrainModule, value: float, active: bool) -> Iterator[None]:
    """While active, the token embedding's first output of the step carries `value` (a bad input on one rank)."""
    if not active:
        yield
        return
    calls = []

    def hook(_mod: torch.nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 1:
            return out
        out = out.clone()
        local(out).view(-1)[0] = value
        return out

    handle = module.model.tok_embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- 5. fp16 loss scaling -------------------------------------------------------------------------------------


def fp16_overflow(parallel: dict[str, Any], param: str, bad_step: int = 1, steps: int = 4) -> dict[str, Any]:
    """fp16 with dynamic loss scaling; at `bad_step` rank 1 alone finds an inf in its (scaled) gradient shard.
    Every rank must skip and back off alike; the one-process fp16 reference overflows at the same step."""
    recipe = tiny_recipe(None, **parallel)
    recipe.precision.dtype = "fp16"
    recipe.precision.loss_scale_init = 1024.0
    recipe.precision.loss_scale_growth_interval = (
        2  # the scale also grows during the run: growth must agree too
    )
    batches = global_batches(steps)
    ref, module = reference(recipe), build(recipe)
    out: dict[str, Any] = {**coords(module), "skipped": [], "scales": [], "ref_scales": []}
    losses, ref_losses = [], []
    for step, batch in enumerate(batches):
        ref.train_batch(batch)
        module.train_batch(rank_slice(module, batch))
        before = local_params(module)
        if step == bad_step:
            inject(ref, param, math.inf)
            if dist.get_rank() == 1:
                inject(module, param, math.inf)
        ref_stats, stats = ref.optim_step(), module.optim_step()
        out["skipped"].append(stats["skipped"])
        out["scales"].append(stats["loss_scale"])
        out["ref_scales"].append(ref_stats["loss_scale"])
        losses.append(stats["loss"])
        ref_losses.append(ref_stats["loss"])
        if step == bad_step:
            out["unchanged"] = all(torch.equal(v, local_params(module)[n]) for n, v in before.items())
    out["loss_rel"] = rel(losses, ref_losses)
    out["param_rel"] = param_rel(module, ref)
    return out


def mixed_precision_tracks(parallel: dict[str, Any], dtype: str, steps: int = 3) -> dict[str, Any]:
    """FSDP2 with parameters in `dtype` (MixedPrecisionPolicy, fp32 reduce) against one fp32 process."""
    recipe = tiny_recipe(None, **parallel)
    batches = global_batches(steps)
    ref = reference(recipe)
    ref_losses = [_step(ref, b)["loss"] for b in batches]
    recipe.precision.dtype = dtype
    module = build(recipe)
    block_param = next(p for n, p in module.model.named_parameters() if ".layers." in f".{n}")
    losses = [_step(module, rank_slice(module, b))["loss"] for b in batches]
    grads_fp32 = all(
        local(p.grad if p.grad is not None else p).dtype == torch.float32 for p in module._params
    )
    return {
        "loss_rel": rel(losses, ref_losses),
        "param_rel": param_rel(module, ref),
        "sharded_dtype": str(local(block_param).dtype),
        "grads_fp32": grads_fp32,
    }


def _step(module: TrainModule, batch: list[Batch]) -> dict[str, Any]:
    module.train_batch(batch)
    return module.optim_step()


# -- 3. activation checkpointing ------------------------------------------------------------------------------


def saved_tensors(module: TrainModule, batch: list[Batch]) -> tuple[int, int, float]:
    """(tensors saved for backward, their bytes, loss) of one forward: torch.autograd.graph.saved_tensors_hooks
    sees every tensor autograd keeps; a checkpointed block keeps only its inputs (the rest is recomputed)."""
    count, size = 0, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count, size
        count += 1
        size += local(t).numel() * t.element_size()
        return t

    module._set_training(True)
    total = module._global_sum(torch.tensor(int((batch[0]["labels"] != -100).sum())))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module._forward_loss(batch[0], total)
    out.loss.backward()
    return count, size, out.ce.item()


def checkpointing_counts(parallel: dict[str, Any], n_layers: int = 4) -> dict[str, Any]:
    """Saved tensors and loss for activation checkpointing none / selective / full (same seed, same batch)."""
    result = {}
    for mode in ("none", "selective", "full"):
        recipe = tiny_recipe({"n_layers": n_layers}, activation_checkpointing=mode, **parallel)
        if dist.is_initialized():
            module: TrainModule = build(recipe)
            batch = rank_slice(module, global_batches(1)[0])
        else:  # one process: the same step of parallelize() on the plain model
            module = reference(recipe)
            apply_activation_checkpointing(module.model, mode)
            batch = global_batches(1)[0]
        result[mode] = saved_tensors(module, batch)
    return result


# -- 4. encoder families --------------------------------------------------------------------------------------

ENCODER = {
    "family": "encoder",
    "position": "learned",
    "norm": "layernorm",
    "norm_position": "post",
    "bias": True,
}
ENCODER_DECODER = {
    "family": "encoder_decoder",
    "n_decoder_layers": 2,
    "position": "relative_bias",
    "norm": "rmsnorm",
    "mlp": "geglu",
    "tie_embeddings": False,
}


def family_batches(family: str, steps: int) -> list[list[Batch]]:
    """MLM (encoder: labels only at ~30% of positions, the rest -100) or seq2seq (encoder_decoder: decoder inputs
    and labels of half the length) micro-batches of one sample, the same on every rank."""
    g = torch.Generator().manual_seed(4321)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(GLOBAL_BATCH):
            tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
            if family == "encoder":
                labels = torch.where(torch.rand(1, SEQ, generator=g) < 0.3, tokens, -100)
                labels[0, 0] = tokens[0, 0]  # never an all-ignored sample
                step.append({"input_ids": tokens, "labels": labels})
            else:
                target = torch.randint(0, VOCAB, (1, SEQ // 2 + 1), generator=g)
                step.append(
                    {"input_ids": tokens, "decoder_input_ids": target[:, :-1], "labels": target[:, 1:]}
                )
        out.append(step)
    return out


def family_parity(parallel: dict[str, Any], model: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """Like dist_cases.parity for the encoder families (their own batches)."""
    recipe = tiny_recipe(model, **parallel)
    batches = family_batches(model["family"], steps)
    ref, module = reference(recipe), build(recipe)
    ref_stats = [_step(ref, b) for b in batches]
    stats = [_step(module, rank_slice(module, b)) for b in batches]
    return {
        "loss_rel": rel([s["loss"] for s in stats], [s["loss"] for s in ref_stats]),
        "norm_rel": rel([s["grad_norm"] for s in stats], [s["grad_norm"] for s in ref_stats]),
        "param_rel": param_rel(module, ref),
        "names_equal": list(full_params(module.model)) == list(full_params(ref.model)),
    }


# -- 6. CPU offload -------------------------------------------------------------------------------------------


def offload_state(parallel: dict[str, Any], meta: bool = False) -> dict[str, Any]:
    """Whether every FSDP2 parameter of the built model is offloaded, and where its shards and gradients live."""
    module = build(tiny_recipe(None, **parallel), meta)
    _step(module, rank_slice(module, global_batches(1)[0]))
    # FSDP2 keeps the policy per parameter on its (private) param group: the one place it is visible
    groups = [m._get_fsdp_state()._fsdp_param_group for m in module.model.modules() if hasattr(m, "unshard")]
    params = [fp for g in groups if g is not None for fp in g.fsdp_params]
    return {
        "offloaded": bool(params) and all(fp.offload_to_cpu for fp in params),
        "devices": sorted({str(local(p).device) for p in module.model.parameters()}),
    }


def meta_parity(parallel: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """dist_cases.parity for a model built the way `loom train` builds it (meta device, sharded init)."""
    recipe = tiny_recipe(None, **parallel)
    batches = global_batches(steps)
    ref, module = reference(recipe), build(recipe, meta=True)
    ref_stats = [_step(ref, b) for b in batches]
    stats = [_step(module, rank_slice(module, b)) for b in batches]
    return {
        "loss_rel": rel([s["loss"] for s in stats], [s["loss"] for s in ref_stats]),
        "norm_rel": rel([s["grad_norm"] for s in stats], [s["grad_norm"] for s in ref_stats]),
        "param_rel": param_rel(module, ref),
        "names_equal": list(full_params(module.model)) == list(full_params(ref.model)),
    }


def pp_nonfinite(
    parallel: dict[str, Any], param: str, value: float, bad_step: int = 1, steps: int = 3
) -> dict[str, Any]:
    """nonfinite_skip for a pipeline layout: `value` in the gradient of `param` on the one rank that holds it at
    tp index 1 (a replicated copy under TP), against one process with the same value at the same step."""
    from dist_cases_pp import build_pipeline_module, pp_recipe, regroup

    recipe = pp_recipe(parallel, None, 2)
    batches = global_batches(steps)
    ref, module = reference(recipe), build_pipeline_module(recipe)
    victim = param in dict(module.model.named_parameters()) and coords(module)["tp"] == 1
    out: dict[str, Any] = {**coords(module), "victim": victim, "skipped": [], "losses": [], "ref_losses": []}
    for step, batch in enumerate(batches):
        ref.train_batch(batch)
        module.train_batch(regroup(rank_slice(module, batch), 2))
        before = local_params(module)
        if step == bad_step:
            inject(ref, param, value)
            if victim:
                inject(module, param, value)
        ref_stats, stats = ref.optim_step(), module.optim_step()
        out["skipped"].append(stats["skipped"])
        out["losses"].append(stats["loss"])
        out["ref_losses"].append(ref_stats["loss"])
        if step == bad_step:
            out["unchanged"] = all(torch.equal(v, local_params(module)[n]) for n, v in before.items())
    out["loss_rel"] = rel(out["losses"], out["ref_losses"])
    return out
