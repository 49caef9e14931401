"""Step-time overhead of Loom's Trainer over a bare PyTorch loop.

Both loops train the same model (framework.models.build_model on the recipe's model section, same init), on the same
random batches, in the same precision, with AdamW, gradient clipping and a LambdaLR schedule. The Trainer runs with
its default callbacks (metrics to JSONL, stability checks; no checkpoint or validation inside the timed steps).
A step's time is measured between consecutive step ends, so it includes everything a loop does per step.
The two loops alternate every `--chunk` steps (bare, trainer, bare, ...) so machine noise hits both alike; the
first `--warmup` steps of each are dropped and the medians compared, for wall time and for the process's CPU time
(robust to other processes competing for the cores). Target: ratio <= 1.05.

    .venv/bin/python benchmarks/overhead.py [--recipe recipes/debug.yaml] [--steps 40] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from framework.config import Recipe
from framework.config.loader import load_recipe
from framework.models import build_model, init_weights
from framework.models.flops import flops_per_token
from framework.train import Callback, Trainer, TrainModule, default_callbacks, lr_multiplier


def make_batches(recipe: Recipe, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (recipe.train.micro_batch_size, recipe.data.seq_len)
    return [
        {
            "input_ids": torch.randint(0, recipe.model.vocab_size, shape, generator=g),
            "labels": torch.randint(0, recipe.model.vocab_size, shape, generator=g),
        }
        for _ in range(count)
    ]


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.precision.dtype]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


def bare_loop(
    model: torch.nn.Module, recipe: Recipe, batches: list[dict], device: torch.device
) -> Iterator[tuple[float, float]]:
    """A plain PyTorch training loop; yields now() at each step end."""
    opt_cfg = recipe.optim
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, recipe.schedule, recipe.train.steps)
    )
    for batch in batches:
        with autocast(recipe, device):
            logits = model(batch["input_ids"].to(device))
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss.item()  # what any loop that logs its loss does
        yield now()


class StepClock(Callback):
    """Records step durations and pauses fit() after `per_round` steps so the loops can alternate."""

    def __init__(self) -> None:
        self.per_round = 1
        self.durations: list[tuple[float, float]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self._last = now()  # the first step of a round counts from here (after the other callbacks' start)
        self._stop_at = trainer.step + self.per_round

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        self._last, previous = now(), self._last
        self.durations.append((self._last[0] - previous[0], self._last[1] - previous[1]))
        trainer.should_stop = trainer.step >= self._stop_at


def run_bare(loop: Iterator[tuple[float, float]], steps: int) -> list[tuple[float, float]]:
    durations, last = [], now()
    for _ in range(steps):
        last, previous = next(loop), last
        durations.append((last[0] - previous[0], last[1] - previous[1]))
    return durations


def build(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(recipe.model)
    model.to_empty(device=device)
    init_weights(model, recipe.model, seed=recipe.train.seed)
    return model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="recipes/debug.yaml")
    parser.add_argument(
        "--set", action="append", default=[], help="recipe override, e.g. train.micro_batch_size=8"
    )
    parser.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    parser.add_argument("--chunk", type=int, default=2, help="steps per turn before switching loops")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps of each loop")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings)")
    return parser.parse_args()


def bench_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe with logging into a temp dir, no progress bar, checkpoint or validation, one micro-batch."""
    recipe = load_recipe(args.recipe, args.set)
    recipe.logging.run_dir = tempfile.mkdtemp(prefix="loom-overhead-")
    recipe.logging.progress_bar = recipe.logging.tensorboard = False
    recipe.checkpoint.save_final, recipe.train.eval_every = False, 0
    recipe.train.global_batch_size = recipe.train.micro_batch_size
    recipe.train.steps = args.warmup + args.steps
    return recipe


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    recipe, device = bench_recipe(args), torch.device("cpu")
    batches = make_batches(recipe, recipe.train.steps)
    model = build(recipe, device)
    bare = bare_loop(copy.deepcopy(model), recipe, batches, device)
    clock = StepClock()
    callbacks = [
        *default_callbacks(recipe, flops_per_token=flops_per_token(recipe.model, recipe.data.seq_len)),
        clock,
    ]
    trainer = Trainer(TrainModule(model, recipe, device), batches, callbacks, recipe)

    run_bare(bare, args.warmup)
    clock.per_round = args.warmup
    trainer.fit()
    clock.durations.clear()
    clock.per_round = args.chunk
    bare_durations = []
    while len(bare_durations) < args.steps:
        bare_durations += run_bare(bare, min(args.chunk, args.steps - len(bare_durations)))
        trainer.fit()
    report(recipe, args, bare_durations, clock.durations)


def report(recipe: Recipe, args: argparse.Namespace, bare: list, ours: list) -> None:
    print(
        f"model d_model={recipe.model.d_model} layers={recipe.model.n_layers} vocab={recipe.model.vocab_size}; "
        f"batch {recipe.train.micro_batch_size}x{recipe.data.seq_len}; precision {recipe.precision.dtype}; "
        f"threads {args.threads}; {len(bare)} + {len(ours)} timed steps"
    )
    for i, clock in enumerate(("wall", "cpu")):
        b = statistics.median(d[i] for d in bare)
        o = statistics.median(d[i] for d in ours)
        print(f"{clock:>4}: bare {b * 1e3:8.2f} ms/step   trainer {o * 1e3:8.2f} ms/step   ratio {o / b:.3f}")
    print("target: ratio <= 1.05")


if __name__ == "__main__":
    main()
