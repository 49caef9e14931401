"""Sequence mixers: forward+backward time per token of attention, Gated DeltaNet and Mamba-2 (issue 23).

Each registry mixer (attention = full causal SDPA, gdn, mamba2) at the same width (`--heads` x `--head-dim`; Mamba-2's
state_dim = head_dim) on one random [1, seq, d_model] input: median time (`--clock` wall or CPU) of `--repeats`
passes after a warm-up, per token and against attention; the linear mixers' time(longest seq) / time(the one
before) against 1.15 x the length ratio (4.6 for 8k / 2k). Then the chunked ops against the token-by-token
recurrences at `--ops-seq` (target >= 20x), and with `--device cuda` (bf16) the kernel libraries (FLA, mamba_ssm)
against the PyTorch chunked ops when they import. Results: docs/benchmarks.md, "Sequence mixers (issue 23)".

    python benchmarks/mixers.py [--seqs 512,2048,8192] [--repeats 3] [--threads N] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from framework.config.schema import GDNConfig, Mamba2Config, ModelConfig
from framework.models import gdn, mamba2
from framework.models.attention import AttentionContext
from framework.models.masks import AttentionMask
from framework.models.mixers import MIXERS

MIXER_NAMES = ("attention", "gdn", "mamba2")
LINEAR_SLACK = 1.15  # the scaling target: within 15% of linear in seq
OPS_TARGET = 20.0  # chunked >= 20x the token-by-token recurrence
QUICK = {"seqs": "64,256", "repeats": 1, "d_model": 64, "heads": 2, "head_dim": 32, "ops_seq": 128}
"""--quick: seconds on a CPU; overheads dominate at these sizes, so its PASS/FAIL lines judge nothing."""
VERDICT = {True: "PASS", False: "FAIL"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="512,2048,8192", help="comma-separated sequence lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ops-seq", type=int, default=2048, help="seq of the chunked vs naive comparison")
    p.add_argument("--ops-forward-only", action="store_true", help="time the naive recurrences forward only")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time (loaded hosts)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, the targets not meaningful")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.seqs = [int(s) for s in args.seqs.split(",")]
    cuda = args.device.startswith("cuda")
    args.dtype = torch.bfloat16 if cuda else torch.float32  # flash SDPA and the kernel libraries want bf16
    args.clock = "wall" if cuda else args.clock  # CPU time does not see the GPU's work
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    h, d = args.heads, args.head_dim
    return ModelConfig(
        d_model=args.d_model, n_heads=h, head_dim=d,
        gdn=GDNConfig(heads=h, key_head_dim=d, value_head_dim=d),
        mamba2=Mamba2Config(heads=h, head_dim=d, state_dim=d),
    )  # fmt: skip


def median_time(step: Callable[[], None], args: argparse.Namespace, repeats: int | None = None, warmup=1):
    """Median seconds (args.clock) of `step` over `repeats` (args.repeats) calls after `warmup` ones; CUDA is
    synchronised around each call."""
    clock, cuda, times = CLOCKS[args.clock], args.device.startswith("cuda"), []
    for i in range(warmup + (args.repeats if repeats is None else repeats)):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(clock() - start)
    return statistics.median(times)


def mixer_step(name: str, cfg: ModelConfig, seq: int, args: argparse.Namespace) -> Callable[[], None]:
    """One forward+backward of the mixer on a random input; parameter gradients are dropped each time."""
    torch.manual_seed(0)
    layer = MIXERS[name].build(cfg).to(args.device, args.dtype)
    x = torch.randn(1, seq, cfg.d_model, device=args.device, dtype=args.dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x, AttentionContext(AttentionMask(causal=True))).backward(grad)

    return step


def ops_inputs(op: str, seq: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Random inputs of the scan ops (layouts of gdn.naive_gated_delta_rule / mamba2.naive_ssd), with grads."""
    gen = torch.Generator().manual_seed(0)
    h, d = args.heads, args.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if op == "gdn":  # g <= 0 (log decay), beta in (0, 1)
        raw = (rand(1, seq, h, d), rand(1, seq, h, d), rand(1, seq, h, d), -rand(1, seq, h).abs() * 0.1,
               rand(1, seq, h).sigmoid())  # fmt: skip
    else:  # x, dt > 0, A < 0, B, C (one group)
        raw = (rand(1, seq, h, d), torch.rand(1, seq, h, generator=gen) * 0.1, -torch.rand(h, generator=gen) - 0.5,
               rand(1, seq, 1, d), rand(1, seq, 1, d))  # fmt: skip
    wide = {3} if op == "gdn" else {1, 2}  # g, or dt and A: float32 in any dtype, as the modules pass them
    dtypes = [torch.float32 if i in wide else args.dtype for i in range(len(raw))]
    return tuple(t.to(args.device, dt).requires_grad_() for t, dt in zip(raw, dtypes, strict=True))


def op_step(fn: Callable[..., tuple[torch.Tensor, ...]], inputs, backward: bool) -> Callable[[], None]:
    """One call of a scan op (forward, or forward+backward of a scalar of its output)."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        y = fn(*inputs)[0]
        if backward:
            y.float().square().sum().backward()

    return step


def op_fns(op: str, chunk: int) -> dict[str, Callable]:
    """The chunked PyTorch op and the token-by-token reference of one mixer."""
    if op == "gdn":
        return {"chunked": lambda *a: gdn.chunked_gated_delta_rule(*a, chunk_size=chunk),
                "naive": gdn.naive_gated_delta_rule}  # fmt: skip
    return {"chunked": lambda *a: mamba2.chunked_ssd(*a, chunk), "naive": mamba2.naive_ssd}


def kernel_fn(op: str) -> tuple[Callable | None, str]:
    """The kernel library's op with the chunked op's signature, or None and why it is absent."""
    if op == "gdn":
        from framework.kernels import fla

        return (fla.fla_gated_delta_rule, "fla") if fla.available() else (None, fla.INSTALL_HINT)
    from framework.kernels import mamba_ssm

    if not mamba_ssm.available():
        return None, mamba_ssm.INSTALL_HINT
    kernel = mamba_ssm.MambaSSMKernel()
    return (lambda x, dt, A, B, C: (kernel.chunk_scan(x, dt, A, B, C, None, 64), None)), "mamba_ssm"


def load_average() -> str:
    """1, 5 and 15 minute load averages: how shared the machine was while it ran."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def report_mixers(args: argparse.Namespace) -> None:
    cfg = model_config(args)
    times: dict[tuple[str, int], float] = {}
    print("| mixer | seq | ms per fwd+bwd | us per token | ratio to attention |")
    print("| --- | --- | --- | --- | --- |")
    for seq in args.seqs:
        for name in MIXER_NAMES:
            times[name, seq] = t = median_time(mixer_step(name, cfg, seq, args), args)
            ratio = t / times["attention", seq]
            print(f"| {name} | {seq} | {t * 1e3:.2f} | {t * 1e6 / seq:.2f} | {ratio:.2f} |", flush=True)
    if len(args.seqs) < 2:
        return
    short, long = sorted(args.seqs)[-2:]
    target = LINEAR_SLACK * long / short
    for name in ("gdn", "mamba2"):
        ratio = times[name, long] / times[name, short]
        print(f"{name}: time({long}) / time({short}) = {ratio:.2f}, "
              f"target <= {target:.2f}: {VERDICT[ratio <= target]}")  # fmt: skip


def report_ops(args: argparse.Namespace) -> None:
    mode = "forward only" if args.ops_forward_only else "forward+backward"
    print(
        f"\nchunked vs naive ops at seq {args.ops_seq} (naive: {mode}; chunked: forward+backward, chunk 64)"
    )
    for op in ("gdn", "mamba2"):
        fns, inputs = op_fns(op, 64), ops_inputs(op, args.ops_seq, args)
        chunked = median_time(op_step(fns["chunked"], inputs, True), args)
        naive = median_time(op_step(fns["naive"], inputs, not args.ops_forward_only), args, 1, 0)
        speedup = naive / chunked
        print(f"{op}: chunked {chunked * 1e3:.2f} ms, naive {naive * 1e3:.2f} ms, speedup {speedup:.1f}x, "
              f"target >= {OPS_TARGET:.0f}x: {VERDICT[speedup >= OPS_TARGET]}")  # fmt: skip


def report_kernels(args: argparse.Namespace) -> None:
    """CUDA: kernel library vs the PyTorch chunked op, forward+backward at the longest seq."""
    seq = max(args.seqs)
    print(f"\nkernel library vs PyTorch chunked op at seq {seq}, {args.dtype}, forward+backward")
    for op in ("gdn", "mamba2"):
        fn, name = kernel_fn(op)
        if fn is None:
            print(f"{op}: skipped, kernel library not importable ({name})")
            continue
        inputs = ops_inputs(op, seq, args)
        lib = median_time(op_step(fn, inputs, True), args)
        torch_t = median_time(op_step(op_fns(op, 64)["chunked"], inputs, True), args)
        print(f"{op}: {name} {lib * 1e3:.2f} ms, PyTorch chunked {torch_t * 1e3:.2f} ms, "
              f"ratio {torch_t / lib:.1f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, threads {args.threads}, {args.clock} clock, "
          f"load average {load_average()}")  # fmt: skip
    print(
        f"d_model {args.d_model}, {args.heads} heads x {args.head_dim}, batch 1, repeats {args.repeats} (median)"
    )
    report_mixers(args)
    report_ops(args)
    if args.device.startswith("cuda"):
        report_kernels(args)
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
