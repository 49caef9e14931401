"""Context-parallel parity cases run on every rank of a `DistPool` (by import path 'dist_cases_cp:name').

Like dist_cases_tp.parity, built the way `loom train` builds a layout (build_parallel_model, train_module_for), with
batches that exercise the whole-sequence masks: packed documents whose boundaries fall on either side of the cp
shard boundary (the mask needs every shard's document ids), prefix-LM prefixes, masked-LM samples with token types.
Evaluation: every cp peer's eval_batch returns the held-out batch's whole-sequence sums (its shards' sums added).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, SEQ, VOCAB, full_params, tiny_recipe
from dist_cases_tp import _sample, train_steps

from framework.engines.build import train_module_for
from framework.models.attention import Attention
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.loss import IGNORE_INDEX
from framework.train.train_module import Batch, TrainModule


def _causal(tokens: torch.Tensor, kind: str, g: torch.Generator) -> Batch:
    """A causal-LM sample with packed documents ('documents'), a prefix-LM prefix ('prefix'), or neither."""
    labels = tokens[1:].clone()
    labels[:3] = IGNORE_INDEX
    batch = {"input_ids": tokens[None, :-1], "labels": labels[None]}
    if kind == "documents":
        # a new document starts at ~1 in 4 tokens: boundaries on both sides of every shard boundary
        starts = torch.rand(SEQ, generator=g) < 0.25
        batch["document_ids"] = starts.long().cumsum(0)[None]
    elif kind == "prefix":
        batch["prefix_lengths"] = torch.randint(3, SEQ - 3, (1,), generator=g)
    return batch


def batches(steps: int, kind: str) -> list[list[Batch]]:
    """Per step, GLOBAL_BATCH micro-batches of one sample (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=g)
    sample = _sample if kind == "mlm" else _causal
    return [[sample(s, kind, g) for s in step] for step in tokens]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def parity(
    steps: int, parallel: dict[str, Any], model: dict[str, Any], kind: str, z_loss: float = 0.0
) -> dict[str, Any]:
    """Train `steps` steps in this layout and on one process; relative differences of per-step losses and
    gradient norms, first-step gradients, parameters after the steps, and a held-out batch's mean loss."""
    recipe = tiny_recipe(model, **parallel)
    recipe.train.z_loss = z_loss
    data = batches(steps + 1, kind)
    train, held_out = data[:steps], data[steps][0]
    cpu = torch.device("cpu")
    reference = TrainModule(materialize_model(recipe.model, cpu, recipe.train.seed), recipe, "cpu")
    ref_losses, ref_norms, ref_grads = train_steps(reference, train)

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    module = train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    losses, norms, grads = train_steps(module, [b[rank * per_rank : (rank + 1) * per_rank] for b in train])

    ref_grads.pop("layout"), grads.pop("layout")
    # Zero in exact arithmetic (softmax ignores a shift shared by all keys): rounding noise, not compared.
    top = max(g.norm() for g in ref_grads.values())
    noise = sorted(n for n, g in ref_grads.items() if g.norm() <= 1e-6 * top)
    ref_params, params = full_params(reference.model), full_params(module.model)
    # MoE selection biases (aux-loss-free balancing) are buffers, moved by the step's global expert loads
    ref_buffers, buffers = dict(reference.model.named_buffers()), dict(module.model.named_buffers())
    param_rel = {n: _rel(params[n], p) for n, p in ref_params.items() if n not in noise}
    grad_rel = {n: _rel(grads[n], g) for n, g in ref_grads.items() if n not in noise}
    (ref_eval, ref_count), (eval_sum, count) = reference.eval_batch(held_out), module.eval_batch(held_out)
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(param_rel.values()),
        "worst_param": max(param_rel, key=param_rel.__getitem__),
        "grad_rel": max(grad_rel.values()),
        "worst_grad": max(grad_rel, key=grad_rel.__getitem__),
        "noise_grads": noise,
        "names_equal": list(params) == list(ref_params),
        "eval_rel": abs(eval_sum.item() - ref_eval.item()) / abs(ref_eval.item()),
        "eval_count_equal": count.item() == ref_count.item(),
        # each rank computed its dp slice's sequence shards only (the engine sliced the batches)
        "tokens_share": module.tokens / reference.tokens,
        "hooked_attention": sum(_hooked(m) for m in module.model.modules()),
        "hooks": sorted({m.attend_hook.func.__name__ for m in module.model.modules() if _hooked(m)}),
        "buffer_rel": max(
            (_rel(b, ref_buffers[n]) for n, b in buffers.items() if ref_buffers[n].norm() > 0), default=0.0
        ),
        "moe_rel": _moe_rel(module, reference),
    }


def assert_matches(result: dict[str, Any]) -> None:
    """The parity rule of `parity`'s report (tolerances: tests/framework/parallel/test_context_parallel.py)."""
    assert result["names_equal"]
    assert max(result["loss_rel"]) <= 1e-5, result
    assert max(result["norm_rel"]) <= 1e-5, result
    assert result["grad_rel"] <= 1e-5, result
    assert result["eval_rel"] <= 1e-5 and result["eval_count_equal"], result
    assert result["param_rel"] <= 1e-4, result
    assert result["buffer_rel"] <= 1e-5 and all(v <= 1e-5 for v in result["moe_rel"].values()), result


def _moe_rel(module: TrainModule, reference: TrainModule) -> dict[str, float]:
    """The last step's router losses and load metrics against one process's (empty for a dense model)."""
    if reference.moe is None or module.moe is None:
        return {}
    got, expected = module.moe.metrics(), reference.moe.metrics()
    return {k: abs(got[k] - v) / max(abs(v), 1e-12) for k, v in expected.items() if isinstance(v, float)}


def _hooked(module: torch.nn.Module) -> bool:
    return isinstance(module, Attention) and module.attend_hook.__class__.__name__ == "partial"


def te_ring_wiring() -> dict[str, Any]:
    """model.kernels te with ring cp = world: what TE's DotProductAttention would be given. The kernel is a
    TEAttention whose call records its context-parallel arguments and the shard it receives instead of
    importing TE (CPU): the ring hook must hand it TE's p2p CP over the ring's ranks and this rank's own shard."""
    from framework.kernels.te import TEAttention

    calls: list[dict[str, Any]] = []

    class Recording(TEAttention):
        def __call__(self, q, k, v, ctx, call):  # noqa: ANN001, ANN204 (TEAttention's signature)
            cp = self.context_parallel
            calls.append({"comm_type": cp.comm_type, "ranks": cp.global_ranks, "q_len": q.shape[2],
                          "group_size": dist.get_world_size(cp.group)})  # fmt: skip
            return torch.zeros_like(q)

    recipe = tiny_recipe({}, cp=dist.get_world_size(), cp_ring=dist.get_world_size())
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    model = build_parallel_model(recipe, dims, mesh, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = Recording()  # what framework/kernels/choice.py use_kernels installs for te
    batch = batches(1, "plain")[0][0]
    from framework.parallel.context import shard_batch

    mine = shard_batch({"input_ids": batch["input_ids"]}, mesh["cp"], dims)
    model(mine["input_ids"], positions=mine["positions"])
    return {"calls": calls, "seq": SEQ}
