"""Frontier blocks (issue 24): Multi-head Latent Attention against GQA attention of equal FLOPs, and the step
overhead of multi-token prediction against what its FLOPs predict.

1. MLA vs GQA: one MLA layer (`--heads`, kv_lora_rank, q_lora_rank, nope / rope / v head dims) and the GQA
   attention layer (same heads, `--kv-heads` KV heads) whose head_dim makes its forward FLOPs per token closest to
   MLA's (framework/models/mixers.py: 2 x matmul parameters + token mixing at the sequence length). Forward +
   backward on one random [1, seq, d_model] input, median of `--repeats` after a warm-up: the time ratio, the FLOP
   ratio, and time per FLOP of MLA relative to GQA (1.0 = MLA runs its FLOPs as fast as GQA runs its own).
2. MTP overhead: a small decoder trained one step (forward, loss, backward) without MTP and with model.mtp depth 1;
   the step-time ratio against the model-FLOP ratio (framework/models/flops.py); target: time ratio <= 1.10 x the
   FLOP ratio.

    python benchmarks/frontier.py [--seq 1024] [--repeats 5] [--threads N] [--quick] [--clock cpu] [--device cuda]

Results: docs/benchmarks.md, "Frontier blocks (issue 24)".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from framework.config.schema import LayersConfig, MLAConfig, ModelConfig, MTPConfig
from framework.models import build_model
from framework.models.attention import AttentionContext
from framework.models.flops import forward_flops_per_sequence
from framework.models.masks import AttentionMask
from framework.models.mixers import MIXERS
from framework.train.loss import compute_loss
from framework.train.mtp_loss import mtp_loss, take_mtp_logits

MTP_SLACK = 1.10  # target: MTP step time ratio <= 1.10 x the FLOP ratio
QUICK = {"seq": 128, "repeats": 1, "d_model": 64, "heads": 4, "vocab": 512, "layers": 2}
"""--quick: seconds on a CPU; overheads dominate at these sizes, so its PASS/FAIL line judges nothing."""
VERDICT = {True: "PASS", False: "FAIL"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="the GQA baseline's KV heads")
    p.add_argument("--vocab", type=int, default=8192, help="the MTP model's vocabulary")
    p.add_argument("--layers", type=int, default=4, help="the MTP model's blocks")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="cpu: process CPU time (loaded hosts)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, the target not meaningful")
    p.add_argument("--device", default="cpu", help="cuda: bf16, wall clock, synchronised around each step")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.cuda = args.device.startswith("cuda")
    args.dtype = torch.bfloat16 if args.cuda else torch.float32  # the flash kernels want bf16 on CUDA
    args.clock = "wall" if args.cuda else args.clock  # CPU time does not see the GPU's work
    return args


def median_time(step: Callable[[], None], args: argparse.Namespace) -> float:
    """Median seconds (args.clock) of `step` over args.repeats calls after one warm-up call."""
    clock, times = CLOCKS[args.clock], []
    for i in range(1 + args.repeats):
        if args.cuda:
            torch.cuda.synchronize()
        start = clock()
        step()
        if args.cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(clock() - start)
    return statistics.median(times)


def mla_config(args: argparse.Namespace) -> ModelConfig:
    """DeepSeek-V3's proportions scaled to d_model: kv latent d/4, q latent 3d/8, nope = v = 2 x rope."""
    d, h = args.d_model, args.heads
    rope = max(2, d // h // 8 * 2)  # a quarter of d / h, even
    mla = MLAConfig(kv_lora_rank=d // 4, q_lora_rank=3 * d // 8, qk_nope_head_dim=2 * rope,
                    qk_rope_head_dim=rope, v_head_dim=2 * rope)  # fmt: skip
    return ModelConfig(
        d_model=d, n_heads=h, layers=LayersConfig(pattern=["mla"]), mla=mla, max_seq_len=args.seq
    )


def layer_flops(name: str, cfg: ModelConfig, seq: int) -> float:
    """Forward FLOPs per token of one mixer layer: 2 x its matmul parameters plus its token mixing."""
    entry = MIXERS[name]
    return 2.0 * entry.matmul_params(cfg) + entry.mixing_flops(cfg, seq, None)


def equal_flops_gqa(mla: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """The GQA attention config (same heads, --kv-heads) whose even head_dim gives the FLOPs closest to MLA's."""
    target = layer_flops("mla", mla, args.seq)
    base = ModelConfig(d_model=args.d_model, n_heads=args.heads, kv_heads=args.kv_heads, max_seq_len=args.seq)
    options = [dataclasses.replace(base, head_dim=hd) for hd in range(2, 513, 2)]
    return min(options, key=lambda c: abs(layer_flops("attention", c, args.seq) - target))


def mixer_step(name: str, cfg: ModelConfig, args: argparse.Namespace) -> Callable[[], None]:
    """One forward+backward of one mixer layer on a random [1, seq, d_model] input (causal, RoPE)."""
    from framework.models.positions import rope_angles

    torch.manual_seed(0)
    layer = MIXERS[name].build(cfg).to(args.device, args.dtype)
    x = torch.randn(1, args.seq, cfg.d_model, device=args.device, dtype=args.dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rope = rope_angles(cfg, torch.arange(args.seq, device=args.device)[None])

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x, AttentionContext(AttentionMask(causal=True), rope=rope)).backward(grad)

    return step


def report_mla(args: argparse.Namespace) -> None:
    mla = mla_config(args)
    gqa = equal_flops_gqa(mla, args)
    m = mla.mla
    print(f"MLA: {args.heads} heads, kv_lora {m.kv_lora_rank}, q_lora {m.q_lora_rank}, nope {m.qk_nope_head_dim}, "
          f"rope {m.qk_rope_head_dim}, v {m.v_head_dim}; GQA: {gqa.n_heads} heads x {gqa.head_dim}, "
          f"{gqa.kv_heads} KV heads")  # fmt: skip
    f_mla, f_gqa = layer_flops("mla", mla, args.seq), layer_flops("attention", gqa, args.seq)
    t_mla = median_time(mixer_step("mla", mla, args), args)
    t_gqa = median_time(mixer_step("attention", gqa, args), args)
    print("| layer | MFLOP per token (fwd) | ms per fwd+bwd |")
    print("| --- | --- | --- |")
    print(f"| mla | {f_mla / 1e6:.3f} | {t_mla * 1e3:.2f} |")
    print(f"| gqa | {f_gqa / 1e6:.3f} | {t_gqa * 1e3:.2f} |")
    flop_ratio, time_ratio = f_mla / f_gqa, t_mla / t_gqa
    print(
        f"mla / gqa: time {time_ratio:.2f}, FLOPs {flop_ratio:.2f}, time per FLOP {time_ratio / flop_ratio:.2f}"
    )


def train_step(cfg: ModelConfig, args: argparse.Namespace) -> Callable[[], None]:
    """Forward, loss (main + MTP when cfg.mtp) and backward of a whole model on one random [1, seq] batch."""
    torch.manual_seed(0)
    model = build_model(cfg).train().to(args.device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), device=args.device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    total = torch.tensor(labels.numel(), device=args.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.cuda):
            logits = model(inputs)
        loss = compute_loss(logits, labels, total, 0.0).loss
        logits = take_mtp_logits(model)
        if logits is not None:
            loss = loss + mtp_loss(logits, labels, total, cfg.mtp.loss_weight).loss
        loss.backward()

    return step


def report_mtp(args: argparse.Namespace) -> None:
    base = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       ffn_hidden=args.d_model * 8 // 3 // 8 * 8, max_seq_len=args.seq)  # fmt: skip
    with_mtp = dataclasses.replace(base, mtp=MTPConfig(depth=1))
    flop_ratio = forward_flops_per_sequence(with_mtp, args.seq) / forward_flops_per_sequence(base, args.seq)
    t_base = median_time(train_step(base, args), args)
    t_mtp = median_time(train_step(with_mtp, args), args)
    ratio = t_mtp / t_base
    print(f"\nMTP depth 1 ({args.layers} blocks, d {args.d_model}, vocab {args.vocab}, seq {args.seq}): "
          f"step {t_base * 1e3:.1f} ms -> {t_mtp * 1e3:.1f} ms")  # fmt: skip
    target = MTP_SLACK * flop_ratio
    print(f"mtp: time ratio {ratio:.3f}, FLOP ratio {flop_ratio:.3f}, target <= {target:.3f}: "
          f"{VERDICT[ratio <= target]}")  # fmt: skip


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, threads {args.threads}, {args.clock} clock, "
          f"seq {args.seq}, repeats {args.repeats} (median), load average {load_average()}")  # fmt: skip
    report_mla(args)
    report_mtp(args)


if __name__ == "__main__":
    main()
