"""Tensor-parallel parity cases run on every rank of a `DistPool` (by import path 'dist_cases_tp:name').

Like dist_cases.parity, but the batches fit each model family (causal LM, masked LM with token types, encoder-
decoder), some labels are ignored (-100) so loss_parallel's ignore_index path runs, the z-loss can be switched on,
and a held-out batch is scored by eval_batch (the sharded head without backward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, SEQ, VOCAB, full_params, tiny_recipe
from torch.distributed.tensor import DTensor

from framework.engines.native import DistributedTrainModule
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.loss import IGNORE_INDEX
from framework.train.train_module import Batch, TrainModule


def _sample(tokens: torch.Tensor, kind: str, g: torch.Generator) -> Batch:
    """One sample [1, ...] of `kind` from SEQ + 1 random tokens."""
    if kind == "causal":
        labels = tokens[1:].clone()
        labels[:3] = IGNORE_INDEX  # e.g. a prompt the loss skips
        return {"input_ids": tokens[None, :-1], "labels": labels[None]}
    if kind == "mlm":
        masked = torch.rand(SEQ, generator=g) < 0.3
        labels = torch.where(masked, tokens[:-1], IGNORE_INDEX)
        types = (torch.arange(SEQ) >= SEQ // 2).long()
        return {"input_ids": tokens[None, :-1], "labels": labels[None], "token_type_ids": types[None]}
    # seq2seq: the encoder reads the tokens, the decoder predicts them reversed (teacher forcing)
    target = tokens.flip(0)
    return {
        "input_ids": tokens[None, :-1],
        "decoder_input_ids": target[None, :-1],
        "labels": target[None, 1:],
    }


def batches(steps: int, kind: str) -> list[list[Batch]]:
    """Per step, GLOBAL_BATCH micro-batches of one sample (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=g)
    return [[_sample(s, kind, g) for s in step] for step in tokens]


def train_steps(module: TrainModule, steps: list[list[Batch]]) -> tuple[list[float], list[float], dict]:
    """dist_cases.train_steps, also returning every parameter's full gradient of the first step (before the
    update): the direct evidence, as Adam's first steps are nearly sign(gradient) and magnify rounding noise."""
    losses, norms, grads = [], [], {}
    for i, micro_batches in enumerate(steps):
        module.train_batch(micro_batches)
        if i == 0:
            grads = {n: _full(p.grad) for n, p in module.model.named_parameters()}
            grads["layout"] = _grad_layout(module.model.tok_embeddings.weight)
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
    return losses, norms, grads


def _grad_layout(weight: torch.Tensor) -> str:
    """'sharded like the weight' when the gradient is a DTensor holding only this rank's part of it."""
    grad = weight.grad
    if not isinstance(grad, DTensor):
        return "plain"
    same = grad.to_local().shape == weight.to_local().shape and grad.placements == weight.placements
    return "sharded like the weight" if same else f"{grad.placements} vs {weight.placements}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def parity(
    steps: int,
    parallel: dict[str, Any],
    model: dict[str, Any] | None = None,
    kind: str = "causal",
    z_loss: float = 0.0,
    fused: bool | None = None,
) -> dict[str, Any]:
    """Train `steps` steps in this layout (built as a run builds it) and on one process; report the relative differences of
    per-step losses and gradient norms, of every parameter, and of a held-out batch's eval_batch loss sum.
    `fused`: optim.fused of both runs (None: the device's default, non-fused on CPU)."""
    recipe = tiny_recipe(model, **parallel)
    recipe.train.z_loss = z_loss
    recipe.optim.fused = fused
    data = batches(steps + 1, kind)
    train, held_out = data[:steps], data[steps][0]
    cpu = torch.device("cpu")
    reference = TrainModule(materialize_model(recipe.model, cpu, recipe.train.seed), recipe, "cpu")
    ref_losses, ref_norms, ref_grads = train_steps(reference, train)
    floor = _noise_floor(recipe, train, full_params(reference.model))

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    net = build_parallel_model(
        recipe, dims, mesh, cpu
    )  # the run's path: meta build, parallelize, sharded init
    module = DistributedTrainModule(net, recipe, "cpu", dims, mesh)
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    losses, norms, grads = train_steps(module, [b[rank * per_rank : (rank + 1) * per_rank] for b in train])

    ref_grads.pop("layout")
    embedding_grad = grads.pop("layout")
    ref_params, params = full_params(reference.model), full_params(module.model)
    # Gradients that are rounding noise (zero in exact arithmetic, e.g. a key bias: softmax ignores a shift
    # shared by all keys) cannot match, and Adam turns them into full-size steps: reported, not compared.
    top = max(g.norm() for g in ref_grads.values())
    noise = sorted(n for n, g in ref_grads.items() if g.norm() <= 1e-6 * top)
    param_rel = {n: _rel(params[n], p) for n, p in ref_params.items() if n not in noise}
    grad_rel = {n: _rel(grads[n], g) for n, g in ref_grads.items() if n not in noise}
    # A tensor may differ by 1e-4 (the bound) or by 10x what one process itself shows when only the
    # summation order changes, whichever is larger.
    beyond = {n: r for n, r in param_rel.items() if r > max(1e-4, 10 * floor[n])}
    ref_eval, eval_sum = reference.eval_batch(held_out)[0].item(), module.eval_batch(held_out)[0].item()
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(param_rel.values()),
        "worst_param": max(param_rel, key=param_rel.__getitem__),
        "params_beyond_tolerance": beyond,
        "noise_floor_worst": max(floor.values()),
        "grad_rel": max(grad_rel.values()),
        "worst_grad": max(grad_rel, key=grad_rel.__getitem__),
        "noise_grads": noise,
        "names_equal": list(params) == list(ref_params),
        "eval_rel": abs(eval_sum - ref_eval) / abs(ref_eval),
        "logits": _logits_layout(module, held_out),
        "embedding_grad": embedding_grad,
        "embedding": str(getattr(module.model.tok_embeddings.weight, "placements", "replicated")),
    }


def _noise_floor(
    recipe: Any, train: list[list[Batch]], ref_params: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per tensor, how far one process's own parameters move when only the summation order changes: the same
    steps with each global batch as ONE micro-batch instead of one-sample micro-batches. Adam divides by
    sqrt(v) + eps, so entries whose gradient is near eps (a LayerNorm bias fed by few labelled tokens) turn
    last-bit differences into visible steps; measured for BERT's embed_norm.bias: 1.2e-4 after 5 steps."""
    merged = [[{k: torch.cat([b[k] for b in step]) for k in step[0]}] for step in train]
    module = TrainModule(
        materialize_model(recipe.model, torch.device("cpu"), recipe.train.seed), recipe, "cpu"
    )
    train_steps(module, merged)
    other = full_params(module.model)
    return {n: _rel(other[n], p) for n, p in ref_params.items()}


def _logits_layout(module: TrainModule, batch: Batch) -> str:
    """The placements of the model's logits (a plain tensor: 'replicated')."""
    with torch.no_grad():
        logits = module._forward(module._to_device(batch))
    return str(logits.placements) if isinstance(logits, DTensor) else "replicated"
