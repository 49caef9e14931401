"""CPU step time of context-parallel layouts relative to one process, and how much of the ring's communication
its compute hides (gloo).

Step time: a small decoder (GQA 4/2, one sequence per step) trains at each sequence length on one process and
under Ulysses cp2, ring cp2 and hybrid cp4 (Ulysses 2 x ring 2), `--steps` timed steps after `--warmup`; rank 0
reports the median; ratio = layout / one process. Every process has one thread, so N processes share the
machine's cores: the ratio measures the layout's communication and bookkeeping, not a speed-up (cores reported).

Overlap: ring cp2's attention alone at the largest sequence length, forward + backward of
framework/parallel/ring.py RingAttention with its waits timed (RingPlan.waits: the time a rank blocks on a transfer
after its compute for the step is done), against the same transfers timed alone (send/receive and wait, nothing to
hide behind). exposed = time waited in the ring / time the transfers take alone; the rest was hidden.
Target (issue 25): exposed <= 25% at 16k.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_parallel.py [--seqs 4096,16384] [--steps 3]

On GPUs (one per process, NCCL), `--device cuda --kernels te` runs TE's own ring where it maps (plain causal ring;
framework/kernels/choice.py) and `--kernels torch` Loom's torch ring: the prepared command is in docs/benchmarks.md.
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
from parallel_overhead import median_step  # this folder's script (sys.path[0] when run as a script)

from framework.config import ModelConfig, ParallelConfig, Recipe
from framework.engines.build import train_module_for
from framework.kernels.choice import resolve_kernels, use_kernels
from framework.models.masks import AttentionMask
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.parallelize import parallelize
from framework.parallel.ring import RingAttention, RingPlan, _shift, _wait, ring_tokens, token_order
from framework.run import materialize_model
from framework.train.train_module import Batch, TrainModule

LAYOUTS: dict[str, tuple[int, dict[str, Any]]] = {
    "ulysses_cp2": (2, {"cp": 2}),
    "ring_cp2": (2, {"cp": 2, "cp_ring": 2}),
    "ring_cp2_contiguous": (2, {"cp": 2, "cp_ring": 2, "cp_load_balance": False}),  # what zigzag balances
    "hybrid_cp4": (4, {"cp": 4, "cp_ring": 2}),
}
HEADS, KV_HEADS = 4, 2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names of LAYOUTS")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process, NCCL")
    p.add_argument("--kernels", choices=["auto", "torch", "te"], default="torch", help="model.kernels")
    return p.parse_args()


def recipe_for(args: argparse.Namespace, seq: int, parallel: dict[str, Any]) -> Recipe:
    model = ModelConfig(
        vocab_size=1024, d_model=args.d_model, n_layers=args.layers, n_heads=HEADS, kv_heads=KV_HEADS,
        ffn_hidden=4 * args.d_model, max_seq_len=seq, mlp="swiglu",
    )  # fmt: skip
    model.kernels = args.kernels
    recipe = Recipe(model=model, parallel=ParallelConfig(data_parallel="ddp", **parallel))
    recipe.train.device = args.device
    if args.device == "cuda":
        recipe.precision.dtype = "bf16"
    recipe.data.seq_len = seq
    recipe.train.global_batch_size = recipe.train.micro_batch_size = 1
    return recipe


def batch(seq: int) -> list[Batch]:
    tokens = torch.randint(0, 1024, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]


def step_worker(rank: int, world: int, args: argparse.Namespace, seq: int, parallel: dict, out: Any) -> None:
    recipe, device = recipe_for(args, seq, parallel), torch.device(args.device)
    dims = ParallelDims.from_recipe(recipe, world)
    mesh = build_mesh(dims, args.device)
    model = parallelize(materialize_model(recipe.model, device, 0), dims, mesh, recipe)
    model = use_kernels(model, resolve_kernels(recipe, device))  # as framework/run.py builds a layout
    step = median_step(train_module_for(model, recipe, device, dims, mesh), batch(seq), args)
    if rank == 0:
        out.put(step)


def overlap_worker(rank: int, world: int, args: argparse.Namespace, seq: int, _: dict, out: Any) -> None:
    """Ring cp2 attention on this rank's zigzag shard: (seconds waited in forward + backward, seconds the same
    transfers take alone), medians over --steps repetitions after --warmup."""
    group = dist.group.WORLD
    order = token_order(seq, world, 1)
    tokens = [ring_tokens(order, world, j) for j in range(world)]
    head_dim, device = args.d_model // HEADS, torch.device(args.device)
    tokens = [t.to(device) for t in tokens]
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, HEADS, seq // world, head_dim, generator=g).to(device).requires_grad_()
    k, v = (
        torch.randn(1, KV_HEADS, seq // world, head_dim, generator=g).to(device).requires_grad_()
        for _ in "kv"
    )
    waited, alone = [], []
    for i in range(args.warmup + args.steps):
        plan = RingPlan(group, rank, AttentionMask(causal=True), tokens, head_dim**-0.5, waits=[])
        RingAttention.apply(q, k, v, plan, None, None, None, None).sum().backward()  # no score terms
        _sync(device)
        dist.barrier()
        kv = torch.stack([k.detach(), v.detach()])
        start = time.perf_counter()
        _wait(_shift(kv, plan), plan)  # forward's K/V transfer
        _wait(_shift(kv.float(), plan, back=True), plan)  # backward's accumulator
        _sync(device)
        if i >= args.warmup:
            waited.append(sum(plan.waits[:-2]))
            alone.append(time.perf_counter() - start)
    if rank == 0:
        out.put((statistics.median(waited), statistics.median(alone)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def entry(rank: int, fn: Any, world: int, port: int, args: argparse.Namespace, *rest: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, args, *rest)
    finally:
        dist.destroy_process_group()


def spawn(fn: Any, world: int, args: argparse.Namespace, *rest: Any) -> Any:
    out = mp.get_context("spawn").Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(entry, (fn, world, port, args, *rest, out), nprocs=world, start_method="spawn")
    return out.get(timeout=5)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"cores {os.cpu_count()}; device {args.device}, kernels {args.kernels}; model d={args.d_model} "
          f"layers={args.layers} heads {HEADS}/{KV_HEADS}")  # fmt: skip
    print(f"{'seq':>7}{'layout':>20}{'procs':>6}{'s/step':>9}{'ratio':>8}")
    for seq in seqs:
        recipe, device = recipe_for(args, seq, {}), torch.device(args.device)
        model = use_kernels(materialize_model(recipe.model, device, 0), resolve_kernels(recipe, device))
        reference = TrainModule(model, recipe, device)
        base = median_step(reference, batch(seq), args)
        print(f"{seq:>7}{'one process':>20}{1:>6}{base:>9.3f}{1.0:>8.2f}", flush=True)
        for name in args.layouts.split(","):
            world, parallel = LAYOUTS[name]
            step = spawn(step_worker, world, args, seq, parallel)
            print(f"{seq:>7}{name:>20}{world:>6}{step:>9.3f}{step / base:>8.2f}", flush=True)
    waited, alone = spawn(overlap_worker, 2, args, max(seqs), {})
    print(f"ring cp2 attention at {max(seqs)}: transfers alone {alone * 1e3:.1f} ms, waited in forward + "
          f"backward {waited * 1e3:.1f} ms: exposed {waited / alone:.1%} (target <= 25%)")  # fmt: skip


if __name__ == "__main__":
    main()
