"""CPU step time of each parallel layout relative to one process, for the same model and global batch (gloo).

Each layout runs in `world` spawned processes (one thread each: N processes share the machine's cores, so this
measures the cost of the layout's communication and bookkeeping, not a speed-up); the reference is one process with
one thread training the same model on the same global batch. Every process builds the model from the seed, trains
`--warmup` steps untimed, then `--steps` timed steps; rank 0 reports the median step time. Ratio = layout / one
process. On a machine with fewer cores than processes the ratio includes the processes' competition for cores
(reported: cores).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/parallel_overhead.py [--layouts ddp2,fsdp2,tp2,pp2 ...]
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
from framework.parallel.parallelize import parallelize
from framework.run import materialize_model
from framework.train.train_module import Batch, TrainModule

LAYOUTS: dict[str, tuple[int, dict[str, Any]]] = {
    "ddp2": (2, {"data_parallel": "ddp"}),
    "fsdp2": (2, {"data_parallel": "fsdp"}),
    "hsdp2x2": (4, {"data_parallel": "hsdp", "dp_replicate": 2, "dp_shard": 2}),
    "tp2": (2, {"tp": 2}),
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}),
    "pp2_1f1b": (2, {"pp": 2}),
    "pp2_interleaved": (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}),
    "pp2_zero_bubble": (2, {"pp": 2, "pp_schedule": "zero_bubble"}),
    "tp2xfsdp2": (4, {"tp": 2, "dp_shard": 2}),
    "pp2xfsdp2": (4, {"pp": 2, "dp_shard": 2}),
    "tp2xpp2": (4, {"tp": 2, "pp": 2, "dp_shard": 1}),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def recipe_for(args: argparse.Namespace, parallel: dict[str, Any]) -> Recipe:
    model = ModelConfig(
        vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=8, kv_heads=4,
        ffn_hidden=4 * args.d_model, max_seq_len=args.seq, mlp="swiglu",
    )  # fmt: skip
    recipe = Recipe(model=model, parallel=ParallelConfig(**parallel))
    recipe.data.seq_len = args.seq
    recipe.train.global_batch_size, recipe.train.micro_batch_size = args.global_batch, args.micro_batch
    recipe.parallel.pp_microbatches = 2 if recipe.parallel.pp > 1 else None
    return recipe


def batches(args: argparse.Namespace, dp_rank: int, dp: int) -> list[Batch]:
    """This data-parallel rank's micro-batches of one global batch (the same tokens every step)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4096, (args.global_batch, args.seq + 1), generator=g)
    mine = tokens.chunk(dp)[dp_rank]
    return [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in mine.split(args.micro_batch)]


def median_step(module: TrainModule, micro_batches: list[Batch], args: argparse.Namespace) -> float:
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        module.train_batch(micro_batches)
        module.optim_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, parallel: dict, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe = recipe_for(args, parallel)
        dims = ParallelDims.from_recipe(recipe, world)
        mesh = build_mesh(dims, "cpu")
        model = parallelize(materialize_model(recipe.model, torch.device("cpu"), 0), dims, mesh, recipe)
        module = train_module_for(model, recipe, torch.device("cpu"), dims, mesh)
        dp_rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
        step = median_step(module, batches(args, dp_rank, dims.dp), args)
        if rank == 0:
            out.put(step)
    finally:
        dist.destroy_process_group()


def run_layout(args: argparse.Namespace, world: int, parallel: dict) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, (world, port, args, parallel, out), nprocs=world, start_method="spawn")
    return out.get(timeout=5)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    recipe = recipe_for(args, {})
    reference = TrainModule(materialize_model(recipe.model, torch.device("cpu"), 0), recipe, "cpu")
    base = median_step(reference, batches(args, 0, 1), args)
    print(f"cores {os.cpu_count()}; model d={args.d_model} layers={args.layers} seq={args.seq} "
          f"global batch {args.global_batch}; one process: {base * 1e3:.1f} ms/step")  # fmt: skip
    print(f"{'layout':<18}{'procs':>6}{'ms/step':>10}{'ratio':>8}")
    for name in args.layouts.split(","):
        world, parallel = LAYOUTS[name]
        step = run_layout(args, world, parallel)
        print(f"{name:<18}{world:>6}{step * 1e3:>10.1f}{step / base:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
