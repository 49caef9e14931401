"""Expert-parallel parity cases run on every rank of a `DistPool` (by import path 'dist_cases_ep:name').

Like dist_cases_tp.parity (the run's build: meta model, parallelize, sharded init; 3 AdamW steps against one process
in the same worker), plus the routing: every router call's expert indices are recorded by a forward hook, hashed
per (step, sample, layer), and compared with one process's; and the smallest top-k margin (the gap between the
k-th and (k+1)-th selection score) of one process's run, so the routing comparison is known to be meaningful.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import torch
import torch.distributed as dist
from dist_cases import GLOBAL_BATCH, full_params, global_batches, tiny_recipe
from torch import nn
from torch.distributed.tensor import DTensor

from framework.models.moe import Routing, moe_layers
from framework.parallel.build import train_module_for
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.train_module import Batch, TrainModule

LR, CLIP = 1e-2, 0.5
"""AdamW learning rate and clipping of the parity runs (clipping below the norm, so it runs)."""
RouteKey = tuple[int, int, str]
"""(step, global sample index, MoE layer name)."""


class RouteLog:
    """Records (layer, routing) for every router call of a model, in call order."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[str, Routing, torch.Tensor]] = []
        for name, layer in moe_layers(model).items():
            layer.router.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], routing: Routing) -> None:
            # the selection scores (bias included), for the top-k margin
            scores = (
                routing.logits.softmax(-1) if module.moe.router == "softmax" else routing.logits.sigmoid()
            )
            bias = getattr(module, "expert_bias", None)
            self.calls.append((name, routing, (scores + bias if bias is not None else scores).detach()))

        return record

    def take(self, step: int, sizes: list[int], first_sample: int, seq: int) -> dict[RouteKey, str]:
        """Hashes of the calls since the last take: micro-batches of `sizes` sequences, layers in call order."""
        calls, self.calls = self.calls, []
        layers = len(calls) // len(sizes)
        out: dict[RouteKey, str] = {}
        sample = first_sample
        for i, size in enumerate(sizes):
            for name, routing, _ in calls[i * layers : (i + 1) * layers]:
                for b, rows in enumerate(routing.experts.view(size, seq, -1)):
                    out[(step, sample + b, name)] = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
            sample += size
        return out

    def margins(self, calls: list[tuple[str, Routing, torch.Tensor]], top_k: int) -> float:
        """Smallest gap between the k-th and (k+1)-th selection score over `calls`."""
        gaps = [s.topk(top_k + 1, dim=-1).values for _, _, s in calls]
        return min((v[:, top_k - 1] - v[:, top_k]).min().item() for v in gaps)


def _train(
    module: TrainModule, log: RouteLog, steps: list[list[Batch]], first_sample: int, seq: int
) -> tuple[list[float], list[float], dict[str, torch.Tensor], dict[RouteKey, str], float, list[dict]]:
    losses, norms, grads, routes, margin, moe = [], [], {}, {}, float("inf"), []
    top_k = module.recipe.model.moe.top_k
    for i, micro_batches in enumerate(steps):
        module.train_batch(micro_batches)
        margin = min(margin, log.margins(log.calls, top_k))
        routes |= log.take(i, [mb["input_ids"].shape[0] for mb in micro_batches], first_sample, seq)
        if i == 0:
            grads = {n: _full(p.grad) for n, p in module.model.named_parameters() if p.grad is not None}
        stats = module.optim_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
        moe.append({k: v for k, v in stats.items() if k.startswith("moe_")})
    return losses, norms, grads, routes, margin, moe


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _merge(micro_batches: list[Batch]) -> list[Batch]:
    """One micro-batch holding all of them (for scopes whose gradient depends on the micro-batch split)."""
    return (
        [{k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}] if micro_batches else []
    )


def parity(
    steps: int, parallel: dict[str, Any], model: dict[str, Any], merge: bool = False, seed: int = 0
) -> dict[str, Any]:
    """`steps` AdamW steps in this layout and on one process, initialised from `seed`. merge: every rank (and the
    reference) runs its share of the global batch as one micro-batch, so the global_batch aux scope's gradient is
    one process's too."""
    recipe = tiny_recipe(model, **parallel)
    # The seeds of test_expert_parallel.py were chosen for their top-k margins along this exact trajectory: pin
    # what shapes it rather than inherit tiny_recipe's optimizer settings.
    recipe.train.seed, recipe.optim.lr, recipe.optim.grad_clip = seed, LR, CLIP
    seq = recipe.data.seq_len
    data = global_batches(steps)
    cpu = torch.device("cpu")
    reference = TrainModule(materialize_model(recipe.model, cpu, recipe.train.seed), recipe, "cpu")
    ref_log = RouteLog(reference.model)
    ref_init = full_params(reference.model)
    ref = _train(reference, ref_log, [_merge(b) if merge else b for b in data], 0, seq)

    dims = ParallelDims.from_recipe(recipe, dist.get_world_size())
    mesh = build_mesh(dims, "cpu")
    module = train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
    init = full_params(module.model)  # the sharded init (each expert from its own generator) is one process's
    init_bitwise = all(torch.equal(init[n], t) for n, t in ref_init.items())
    per_rank = GLOBAL_BATCH // dims.dp
    rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    mine = [b[rank * per_rank : (rank + 1) * per_rank] for b in data]
    start = time.perf_counter()
    got = _train(
        module, RouteLog(module.model), [_merge(b) if merge else b for b in mine], rank * per_rank, seq
    )
    seconds = time.perf_counter() - start

    (
        (ref_losses, ref_norms, ref_grads, ref_routes, margin, ref_moe),
        (losses, norms, grads, routes, _, moe),
    ) = ref, got
    ref_params, params = full_params(reference.model), full_params(module.model)
    param_rel = {n: _rel(params[n], p) for n, p in ref_params.items()}
    grad_rel = {n: _rel(grads[n], g) for n, g in ref_grads.items() if g.norm() > 0}
    experts = [p for n, p in module.model.named_parameters() if ".experts." in n]
    return {
        "loss_rel": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)],
        "norm_rel": [abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)],
        "param_rel": max(param_rel.values()),
        "worst_param": max(param_rel, key=param_rel.__getitem__),
        "grad_rel": max(grad_rel.values()),
        "worst_grad": max(grad_rel, key=grad_rel.__getitem__),
        "names_equal": list(params) == list(ref_params),
        "init_bitwise": init_bitwise,
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
        "expert_local_shape": [tuple(p.to_local().shape) for p in experts[:1]],
        "expert_mesh": [tuple(p.device_mesh.mesh_dim_names or ()) for p in experts[:1]],
        "seconds": seconds,
    }


def exchange_with_idle_rank() -> dict[str, Any]:
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
