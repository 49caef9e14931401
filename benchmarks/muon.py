"""Optimizer step time of Muon vs AdamW, on one process and on FSDP2 x 2 (gloo, one thread per process).

Gradients come from one real forward/backward of the layout (so they have its placements) and stay fixed; each
timed call is `optimizer.step()` alone (median of --steps after --warmup). Muon's step is broken down by phase
(framework/train/muon.py's PhaseClock: momentum, gather, iterate, scatter, apply, and AdamW for the other
parameters), the slowest rank's per phase. The target (issue 26): the distributed Muon step costs no more than
1.3 x (one-process Muon step / world) + its measured gather and scatter time:

    ratio = fsdp Muon step / (one-process Muon step / world + gather + scatter)     target <= 1.3

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/muon.py [--d-model 256 --layers 4 --world 2]

On a machine with fewer cores than processes the ranks share cores and the ratio includes that (reported: cores).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framework.config import ModelConfig, ParallelConfig, Recipe
from framework.engines.build import train_module_for
from framework.parallel.dims import ParallelDims, build_mesh
from framework.run import build_parallel_model, materialize_model
from framework.train.muon import MuonAdamW
from framework.train.train_module import Batch, TrainModule

PHASES = ("momentum", "gather", "iterate", "scatter", "apply", "adamw")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args()


def recipe_for(args: argparse.Namespace, optimizer: str, parallel: dict[str, Any]) -> Recipe:
    model = ModelConfig(
        vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=8, kv_heads=4,
        ffn_hidden=4 * args.d_model, max_seq_len=64, mlp="swiglu",
    )  # fmt: skip
    recipe = Recipe(model=model, parallel=ParallelConfig(**parallel))
    recipe.data.seq_len = 64
    recipe.train.global_batch_size, recipe.train.micro_batch_size = 2 * args.world, 2
    recipe.optim.name = optimizer
    return recipe


def _batch(dp_rank: int) -> list[Batch]:
    tokens = torch.randint(0, 4096, (2, 65), generator=torch.Generator().manual_seed(dp_rank))
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]


def time_steps(
    module: TrainModule, batch: list[Batch], args: argparse.Namespace
) -> tuple[float, dict[str, float]]:
    """(median optimizer.step() seconds, seconds per Muon phase per step) with the gradients of one batch."""
    module.train_batch(batch)
    module._pending = None  # the step below is the optimizer's alone (no clipping, no logging)
    optimizer = module.optimizer
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and isinstance(optimizer, MuonAdamW):
            optimizer.timings = {}
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    phases = getattr(optimizer, "timings", None) or {}
    return statistics.median(times[args.warmup :]), {k: v / args.steps for k, v in phases.items()}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, optimizer: str, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe = recipe_for(args, optimizer, {"data_parallel": "fsdp"})
        dims = ParallelDims.from_recipe(recipe, world)
        mesh = build_mesh(dims, "cpu")
        cpu = torch.device("cpu")
        module = train_module_for(build_parallel_model(recipe, dims, mesh, cpu), recipe, cpu, dims, mesh)
        step, phases = time_steps(module, _batch(rank), args)
        # the slowest rank's step and phases: the step ends when the last rank's does
        values = torch.tensor([step, *(phases.get(p, 0.0) for p in PHASES)])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put((values[0].item(), dict(zip(PHASES, values[1:].tolist(), strict=True))))
    finally:
        dist.destroy_process_group()


def run_fsdp(args: argparse.Namespace, optimizer: str) -> tuple[float, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        worker, (args.world, port, args, optimizer, out), nprocs=args.world, start_method="spawn"
    )
    return out.get(timeout=5)


def one_process(args: argparse.Namespace, optimizer: str) -> tuple[float, dict[str, float]]:
    recipe = recipe_for(args, optimizer, {})
    module = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    return time_steps(module, _batch(0), args)


def _row(name: str, step: float, phases: dict[str, float]) -> str:
    parts = " ".join(f"{p} {phases[p] * 1e3:.1f}" for p in PHASES if p in phases)
    return f"{name:<22}{step * 1e3:>10.1f} ms   {parts}"


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    print(
        f"cores {os.cpu_count()}; d_model {args.d_model}, {args.layers} layers (swiglu, GQA); FSDP2 x {args.world}"
    )
    adamw_one, _ = one_process(args, "adamw")
    muon_one, muon_one_phases = one_process(args, "muon")
    adamw_fsdp, _ = run_fsdp(args, "adamw")
    muon_fsdp, phases = run_fsdp(args, "muon")
    print(_row("adamw one process", adamw_one, {}))
    print(_row("muon one process", muon_one, muon_one_phases))
    print(_row(f"adamw fsdp2 x{args.world}", adamw_fsdp, {}))
    print(_row(f"muon fsdp2 x{args.world}", muon_fsdp, phases))
    budget = muon_one / args.world + phases["gather"] + phases["scatter"]
    print(f"muon / adamw: one process {muon_one / adamw_one:.2f}, fsdp2 {muon_fsdp / adamw_fsdp:.2f}")
    print(
        f"fsdp Muon step / (one-process Muon / {args.world} + gather + scatter) = {muon_fsdp * 1e3:.1f} / "
        f"{budget * 1e3:.1f} ms = {muon_fsdp / budget:.2f} (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
