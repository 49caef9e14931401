"""MoE layer forward+backward time vs a dense FFN with the same active FLOPs, on CPU.

The MoE layer (framework.models.moe.MoE: router, dispatch, one SwiGLU expert per group of tokens, combine) with
`--experts` experts of width `--expert-hidden` and top-`--top-k` routing does, per token, the matmuls of top_k
experts plus the router. The dense reference (framework.models.mlp.FeedForward) has width top_k x expert_hidden,
i.e. the same expert matmul FLOPs per token (the router's d_model x experts is extra, and reported). Both run on
the same random input [batch, seq, d_model]; the two are timed alternately and the medians compared (wall time).
Ratio = MoE / dense; the excess is routing, sorting, gathers/scatters and the per-expert loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/moe_layer.py [--d-model 512 --experts 8 --top-k 2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from framework.config.schema import ModelConfig, MoEConfig
from framework.models.mlp import FeedForward
from framework.models.moe import MoE


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=704)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


def layers(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    moe = MoEConfig(n_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden)
    cfg = ModelConfig(d_model=args.d_model, n_heads=8, ffn_hidden=args.top_k * args.expert_hidden, moe=moe)
    torch.manual_seed(0)
    sparse, dense = MoE(cfg), FeedForward(cfg)
    for p in sparse.parameters():
        nn.init.normal_(p, 0.0, 0.02)
    return sparse, dense


def step_time(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    args = parse()
    sparse, dense = layers(args)
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for i in range(args.warmup + args.repeats):
        for name, layer in (("moe", sparse), ("dense", dense)):
            elapsed = step_time(layer, x)
            if i >= args.warmup:
                times[name].append(elapsed)
    moe_t, dense_t = statistics.median(times["moe"]), statistics.median(times["dense"])
    tokens = args.batch * args.seq
    router_share = args.experts / (3 * args.top_k * args.expert_hidden)
    print(
        f"tokens {tokens}, d_model {args.d_model}, {args.experts} experts x {args.expert_hidden}, top-{args.top_k}"
    )
    print(
        f"dense FFN width {args.top_k * args.expert_hidden} (router adds {router_share:.2%} of the expert FLOPs)"
    )
    print(f"forward+backward median: moe {moe_t * 1e3:.1f} ms, dense {dense_t * 1e3:.1f} ms")
    print(f"ratio moe / dense: {moe_t / dense_t:.2f}")


if __name__ == "__main__":
    main()
