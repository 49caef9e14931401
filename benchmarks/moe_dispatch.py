"""CPU cost of expert parallelism's token exchange against the experts' own compute, for one MoE layer (gloo).

Two spawned processes (one thread each) hold half of the experts each (framework/parallel/expert.py). Each times
the forward of one MoE layer over its own tokens and splits it into: the exchange (`MoE.run_experts` minus the
experts: the count exchange, the dispatch all_to_all_single, the regrouping by expert, and the combine's reverse
all_to_all_single) and the local experts' compute. Every timed forward starts after a barrier; the medians over
`--iters` forwards are reported, the slower rank's, with their ratio (exchange / experts).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_dispatch.py [--tokens 4096 --d-model 256 ...]

Measured (November 2026, the 2-core CPU machine shared with other jobs, load average 12-33; defaults): exchange
257 ms vs experts 591 ms (ratio 0.44), and 55 ms vs 198 ms (ratio 0.28) in a second run: on CPU/gloo the two
all-to-alls of 4096 x 2 rows of 256 floats cost about a third of the expert matmuls they feed.
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
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import init_device_mesh

from framework.config import ModelConfig
from framework.config.schema import MoEConfig
from framework.models.moe import MoE
from framework.parallel.expert import apply_expert_parallel

WORLD = 2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per forward")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


class Timed:
    """Calls `fn` and adds its wall time to `seconds` (waiting for an asynchronous collective's result)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = self.fn(*args)
        if isinstance(out, AsyncCollectiveTensor):
            out = out.wait()
        self.seconds += time.perf_counter() - start
        return out


def _worker(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    moe_cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden)
    cfg = ModelConfig(d_model=args.d_model, n_heads=4, mlp="swiglu", moe=moe_cfg)
    torch.manual_seed(0)
    layer = MoE(cfg)
    apply_expert_parallel(layer, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",)))
    for p in layer.parameters():
        torch.nn.init.normal_(p.to_local() if hasattr(p, "to_local") else p, std=0.02)
    exchange = layer.run_experts
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d_model, generator=g)
    exchange_s, experts_s = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            experts = Timed(layer.experts)
            timed = Timed(lambda _, t, counts, experts=experts: exchange(experts, t, counts))
            layer.run_experts = timed
            dist.barrier()
            layer(x)
            if i >= args.warmup:
                exchange_s.append(timed.seconds - experts.seconds)
                experts_s.append(experts.seconds)
    medians = torch.tensor([statistics.median(exchange_s), statistics.median(experts_s)])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put(medians.tolist())
    dist.destroy_process_group()


def main() -> None:
    args = parse()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    exchange, experts = results.get(timeout=600)
    for p in procs:
        p.join()
    print(
        f"MoE layer, {WORLD} processes (ep {WORLD}), {args.tokens} tokens/rank, d_model {args.d_model}, "
        f"{args.experts} experts x {args.expert_hidden} hidden, top-{args.top_k}; cores: {os.cpu_count()}"
    )
    print(f"dispatch + combine (all-to-all exchange): {exchange * 1e3:8.2f} ms")
    print(f"expert compute (local experts):           {experts * 1e3:8.2f} ms")
    print(f"ratio exchange / experts:                 {exchange / experts:8.3f}")


if __name__ == "__main__":
    main()
