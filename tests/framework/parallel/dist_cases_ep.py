"""Expert-parallel (and pipelined MoE) parity cases run on every rank of a `DistPool` ('dist_cases_ep:name').

Like dist_cases_tp.parity (the run's build: meta model, parallelize, sharded init; AdamW steps against one process in
the same worker), plus the routing: every router call's expert indices are recorded by a forward hook, hashed per
(step, sample, layer, sequence shard), and compared with one process's; and the smallest top-k margin (the gap
between the k-th and (k+1)-th selection score) of one process's run, so the routing comparison is known to be
meaningful. Pipelines: each rank compares the parameters and routing of the layers it holds; every micro-batch of
`chunks` samples is split into one-sample pipeline chunks, the reference's micro-batches. Context parallelism: a
rank's router calls cover its sequence shard, compared with the same shard of one process's call.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, SEQ, full_params, global_batches, tiny_recipe
from dist_cases_pp import regroup
from torch import nn
from torch.distributed.tensor import DTensor

from framework.engines.build import train_module_for
from framework.models.moe import Routing, moe_layers
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.ring import token_order
from framework.run import build_parallel_model, materialize_model
from framework.train.train_module import Batch, TrainModule

LR, CLIP = 1e-2, 0.5
"""AdamW learning rate and clipping of the parity runs (clipping below the norm, so it runs)."""
RouteKey = tuple[int, int, str, int]
"""(step, global sample index, MoE layer name, sequence shard)."""


class RouteLog:
    """Records (layer, routing) for every router call of a model, in call order."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[str, Routing, torch.Tensor]] = []
        for name, layer in moe_layers(model).items():
            layer.router.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], routing: Routing) -> None:
            if torch._C._current_graph_task_id() != -1:
                return  # activation checkpointing recomputes the forward inside backward: not a new decision
            # the selection scores (bias included), for the top-k margin; from detached logits, so the hook saves
            # no tensors for backward (checkpointing compares the forward's saved tensors with its recomputation's)
            logits = routing.logits.detach()
            scores = logits.softmax(-1) if module.moe.router == "softmax" else logits.sigmoid()
            bias = getattr(module, "expert_bias", None)
            self.calls.append((name, routing, scores + bias if bias is not None else scores))

        return record

    def take(
        self,
        step: int,
        sizes: list[int],
        first_sample: int,
        shards: int,
        shard: int,
        order: torch.Tensor | None = None,
    ) -> dict[RouteKey, str]:
        """Hashes of the calls since the last take: per layer, its last len(sizes) calls are the micro-batches (or
        pipeline chunks) of `sizes` sequences in order (an earlier call is torch's pipeline shape inference on
        placeholders); each call's sequences are cut into `shards` parts, keyed shard, shard + 1, ...; `order`: the
        cp token order the shards read the sequence in (ring attention's zigzag; None = natural)."""
        calls, self.calls = self.calls, []
        out: dict[RouteKey, str] = {}
        for name in dict.fromkeys(n for n, _, _ in calls):
            mine = [routing for n, routing, _ in calls if n == name][-len(sizes) :]
            sample = first_sample
            for size, routing in zip(sizes, mine, strict=True):
                rows = routing.experts.view(size, -1, routing.experts.shape[-1])
                for b, sequence in enumerate(rows):
                    sequence = sequence if order is None else sequence[order]
                    for j, part in enumerate(sequence.chunk(shards)):
                        key = (step, sample + b, name, shard + j)
                        out[key] = hashlib.sha256(part.contiguous().numpy().tobytes()).hexdigest()
                sample += size
        return out

    def margins(self, calls: list[tuple[str, Routing, torch.Tensor]], top_k: int) -> float:
        """Smallest gap between the k-th and (k+1)-th selection score over `calls`."""
        gaps = [s.topk(top_k + 1, dim=-1).values for _, _, s in calls]
        return min((v[:, top_k - 1] - v[:, top_k]).min().item() for v in gaps)


Trace = tuple[list[float], list[float], dict[str, torch.Tensor], dict[RouteKey, str], float, list[dict], list]
"""Per step: losses, grad norms; first-step grads; route hashes; smallest margin; MoE metrics; eval sums."""


def _train(
    module: TrainModule,
    steps: list[list[Batch]],
    first_sample: int,
    shards: tuple[int, int],
    evaluate: list[Batch],
    order: torch.Tensor | None = None,
) -> Trace:
    """Train `steps`; after step 1 (of 0, 1, ...) evaluate the batches `evaluate` once and sum their cross-entropy
    (a pipeline then re-infers its shapes before the next step)."""
    log = RouteLog(module.model)
    losses, norms, grads, routes, margin, moe, evals = [], [], {}, {}, float("inf"), [], []
    top_k = module.recipe.model.moe.top_k
    for i, micro_batches in enumerate(steps):
        module.train_batch(micro_batches)
        if log.calls:  # a pipeline rank may hold no MoE layer
            margin = min(margin, log.margins(log.calls, top_k))
        sizes = [mb["input_ids"].shape[0] for mb in micro_batches]
        routes |= log.take(i, _chunk_sizes(module, sizes), first_sample, *shards, order)
        if i == 0:
            grads = {n: _full(p.grad) for n, p in module.model.named_parameters() if p.grad is not None}
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
        moe.append({k: v for k, v in stats.items() if k.startswith("moe_")})
        if i == 1 and evaluate:
            evals.append(sum(module.eval_batch(batch)[0].item() for batch in evaluate))
            log.calls.clear()
    return losses, norms, grads, routes, margin, moe, evals


def _chunk_sizes(module: TrainModule, sizes: list[int]) -> list[int]:
    """Sequences per router call: the micro-batches, or with a pipeline their chunks."""
    dims = getattr(module, "dims", None)
    if dims is None or dims.pp == 1:
        return sizes
    chunks = module.recipe.parallel.pp_microbatches or dims.pp_stages
    return [size // chunks for size in sizes for _ in range(chunks)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _merge(micro_batches: list[Batch]) -> list[Batch]:
    """One micro-batch holding all of them (for scopes whose gradient depends on the micro-batch split)."""
    return (
        [{k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}] if micro_batches else []
    )


def parity(
    steps: int,
    parallel: dict[str, Any],
    model: dict[str, Any],
    merge: bool = False,
    seed: int = 0,
    micro_batch: int = 1,
) -> dict[str, Any]:
    """`steps` AdamW steps in this layout and on one process, initialised from `seed`. merge: every rank (and the
    reference) runs its share of the global batch as one micro-batch, so the global_batch aux scope's gradient is
    one process's too. micro_batch: samples per micro-batch of a pipeline layout (split into as many one-sample
    chunks); the reference runs one-sample micro-batches."""
    recipe = _recipe(parallel, model, seed, micro_batch)
    data = global_batches(steps)
    held_out = global_batches(steps + 1)[steps][:micro_batch]
    cpu = torch.device("cpu")
    reference = TrainModule(materialize_model(recipe.model, cpu, recipe.train.seed), recipe, "cpu")
    ref_init = full_params(reference.model)
    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    # a pipeline evaluates one micro-batch in one-sample chunks, the reference those samples (capacities per call)
    ref_held_out, held_out = (held_out, regroup(held_out, micro_batch)) if dims.pp > 1 else ([], [])
    order = (
        token_order(SEQ, dims.cp_ring, dims.cp_ulysses, balanced=dims.cp_balanced)
        if dims.cp_ring > 1
        else None
    )
    ref = _train(reference, [_merge(b) if merge else b for b in data], 0, (dims.cp, 0), ref_held_out, order)

    mesh = build_mesh(dims, "cpu")
    module = train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
    init = full_params(module.model)  # the sharded init (each expert from its own generator) is one process's
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    mine = [b[rank * per_rank : (rank + 1) * per_rank] for b in data]
    mine = [_merge(b) if merge else regroup(b, micro_batch) for b in mine]
    start = time.perf_counter()
    got = _train(module, mine, rank * per_rank, (1, mesh["cp"].get_local_rank()), held_out)
    seconds = time.perf_counter() - start
    return _compare(ref, got, ref_init, init, reference, module) | {"seconds": seconds}


def _recipe(parallel: dict[str, Any], model: dict[str, Any], seed: int, micro_batch: int) -> Any:
    recipe = tiny_recipe(model, **parallel)
    # The seeds of test_expert_parallel.py were chosen for their top-k margins along this exact trajectory: pin
    # what shapes it rather than inherit tiny_recipe's optimizer settings.
    recipe.train.seed, recipe.optim.lr, recipe.optim.grad_clip = seed, LR, CLIP
    recipe.train.micro_batch_size = micro_batch
    return recipe


def _compare(
    ref: Trace,
    got: Trace,
    ref_init: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor],
    reference: TrainModule,
    module: TrainModule,
) -> dict[str, Any]:
    """Differences of this rank's run from one process's, over the parameters (and routes) this rank holds."""
    (
        (ref_losses, ref_norms, ref_grads, ref_routes, margin, ref_moe, ref_evals),
        (losses, norms, grads, routes, _, moe, evals),
    ) = ref, got
    ref_params, params = full_params(reference.model), full_params(module.model)
    param_rel = {n: _rel(p, ref_params[n]) for n, p in params.items()}
    grad_rel = {n: _rel(g, ref_grads[n]) for n, g in grads.items() if ref_grads[n].norm() > 0}
    experts = [p for n, p in module.model.named_parameters() if ".experts." in n]
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(param_rel.values()),
        "worst_param": max(param_rel, key=param_rel.__getitem__),
        "grad_rel": max(grad_rel.values()),
        "worst_grad": max(grad_rel, key=grad_rel.__getitem__),
        # every layout keeps the full model's names (a pipeline rank: those of the modules it holds)
        "names_equal": list(params) == [n for n in ref_params if n in params],
        "held_params": len(params),
        "init_bitwise": all(torch.equal(t, ref_init[n]) for n, t in init.items()),
        "routes_compared": len(routes),
        "moe_metrics_rel": max(
            abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
            for a, b in zip(moe, ref_moe, strict=True)
            for k in ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction", "moe_router_entropy")
        ),
        "tokens_per_expert_equal": [m["moe_tokens_per_expert"] for m in moe]
        == [m["moe_tokens_per_expert"] for m in ref_moe],
        "routes_differing": sorted(str(k) for k, h in routes.items() if ref_routes.get(k) != h),
        "min_margin": margin,
        "eval_rel": [abs(a - b) / abs(b) for a, b in zip(evals, ref_evals, strict=True)],
        "expert_local_shape": [tuple(_local(p).shape) for p in experts[:1]],
        "expert_mesh": [
            tuple(p.device_mesh.mesh_dim_names or ()) for p in experts[:1] if isinstance(p, DTensor)
        ],
    }


def exchange_with_idle_rank(kernel: str = "loop") -> dict[str, Any]:
    """One MoE layer split over every rank (ep = world) whose selection bias sends every token to the first rank's
    experts: the other ranks receive no rows, yet forward and backward must reach the same collectives. Compares
    each rank's output and the experts' gradients (summed over the ranks' tokens) with one process's layer."""
    from torch.distributed.device_mesh import init_device_mesh

    from framework.config import ModelConfig
    from framework.config.schema import MoEConfig
    from framework.models.moe import MoE
    from framework.parallel.expert import apply_expert_parallel

    world, rank = dist.get_world_size(), dist.get_rank()
    moe = MoEConfig(n_experts=2 * world, top_k=2, expert_hidden=16, bias_update_rate=0.01)
    torch.manual_seed(0)
    reference = MoE(ModelConfig(d_model=32, n_heads=4, mlp="swiglu", moe=moe))
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.1)
        reference.router.expert_bias[:2] = 1.0  # experts 0 and 1 (the first rank's) win every selection
    layer = copy.deepcopy(reference)
    apply_expert_parallel(layer, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    layer.experts.kernel = kernel  # the reference runs the loop
    xs = [torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    out = layer(xs[rank])
    out.square().sum().backward()
    ref_out = [reference(x) for x in xs]
    sum(o.square().sum() for o in ref_out).backward()
    experts_here = slice(rank * 2, rank * 2 + 2)
    return {
        "out_rel": _rel(out, ref_out[rank].detach()),
        # the layer's gradients are scaled by 1/ep for FSDP's average (expert.py), so ep x them is the sum
        "grad_rel": max(
            _rel(
                world * getattr(layer.experts, n).grad.to_local(),
                getattr(reference.experts, n).grad[experts_here],
            )
            for n in ("w1", "w2", "w3")
        ),
        "local_grad_norm": layer.experts.w1.grad.to_local().norm().item(),
    }
