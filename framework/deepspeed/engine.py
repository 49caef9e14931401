"""DeepSpeedTrainModule: the Trainer's engine interface on top of a DeepSpeed engine (ZeRO 0-3, CPU offload).

The model, its initialisation, the optimizer (Loom's AdamW and parameter groups), the LR schedule and the loss are
the native engine's; DeepSpeed owns gradient reduction, partitioning, clipping and the optimizer step. Every rank
is a data-parallel rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from framework.config import Recipe
from framework.deepspeed.checkpoint import ENGINE_DIR, weights_only_loads
from framework.deepspeed.config import ds_config, import_deepspeed
from framework.deepspeed.ulysses import apply_deepspeed_ulysses, sequence_group
from framework.parallel.context import shard_sequence
from framework.train.train_module import Batch, StepCounters, StepVeto, TrainModule


class DeepSpeedTrainModule(TrainModule):
    """`model` is the whole model on `device`, initialised identically on every rank (DeepSpeed partitions it)."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device | str) -> None:
        super().__init__(model, recipe, device)  # Loom's optimizer, scheduler, precision (bf16 autocast)
        deepspeed = import_deepspeed(self.device)
        self.world = dist.get_world_size()
        self.ds_config = ds_config(recipe, self.world)
        self.cp = recipe.parallel.cp
        self.sp_rank = dist.get_rank() % self.cp  # sequence groups are blocks of cp consecutive ranks
        if self.cp > 1:
            apply_deepspeed_ulysses(model, sequence_group(self.cp))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.fp16 = recipe.precision.dtype == "fp16"
        if self.fp16:
            # DeepSpeed scales the loss and skips overflowed steps itself (its fp16 mode, weights in fp16):
            # Loom's GradScaler and fp16 autocast step aside
            self.precision.scaler, self.precision.autocast_dtype = None, None

    def train_batch(self, micro_batches: list[Batch]) -> dict[str, Any]:
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(
                f"{len(micro_batches)} micro-batches, DeepSpeed accumulates "
                f"{self.engine.gradient_accumulation_steps()}"
            )
        return super().train_batch(micro_batches)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # Loom's loss is already normalised by the global batch's labelled tokens; DeepSpeed divides each
        # micro-batch loss by the accumulation steps and averages gradients over ranks: undo both factors.
        self.engine.backward(loss * (self.engine.gradient_accumulation_steps() * self.world))
        if not last:
            self.engine.step()  # inside the accumulation window DeepSpeed only counts the micro-step

    def optim_step(self, veto: StepVeto | None = None) -> dict[str, Any]:
        """DeepSpeed's step: reduce what is pending, clip to optim.grad_clip, update, zero the gradients. The
        update cannot be vetoed (train.spike_sigma is refused); a non-finite loss stops the run before it."""
        if self._pending is None:
            raise RuntimeError("optim_step() called without a train_batch() since the last step")
        ce, z, labelled = self._pending
        self._pending = None
        loss, z_loss, n_labelled = torch.stack([ce, z, labelled.float()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(z_loss)):
            raise FloatingPointError(
                f"step {self.step + 1}: loss {loss}; the DeepSpeed engine cannot skip an update, so it stops here "
                "(the model has not taken this step)"
            )
        lr = self.lr
        self.engine.step()
        applied = self.engine.was_step_applied()  # False: fp16 overflow, DeepSpeed skipped and backed off
        if applied:
            self.scheduler.step()  # Loom's schedule on Loom's optimizer, whose groups DeepSpeed steps
            self.counters.updates += 1
            self.counters.consecutive_skips = 0
        else:
            self.counters.skipped_steps += 1
            self.counters.consecutive_skips += 1
        self.counters.step += 1
        norm = float(self.engine.get_global_grad_norm() or 0.0) if applied else math.inf
        stats = {"step": self.step, "loss": loss, "z_loss": z_loss, "grad_norm": norm}
        report = self._step_report(lr, None if applied else "nonfinite")
        if self.fp16:
            report["loss_scale"] = float(self.engine.optimizer.cur_scale)
        return {**stats, **report, "labelled_tokens": int(n_labelled)}

    def _forward(self, batch: Batch) -> torch.Tensor:
        kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        with self.precision.autocast():
            return self.engine(batch["input_ids"], **kwargs)  # ZeRO-3 gathers each layer's parameters

    def _to_device(self, batch: Batch) -> Batch:
        return shard_sequence(super()._to_device(batch), self.cp, self.sp_rank)  # this rank's sequence shard

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        dist.all_reduce(out)  # every rank is a data-parallel rank
        return out

    # -- checkpoints: DeepSpeed's files for the model and optimizer, Loom's JSON for the rest ------------------

    def state_dict(self) -> dict[str, Any]:
        """What Loom keeps itself (JSON, in meta.json): schedule and counters. Model and optimizer state are
        DeepSpeed's, written by `save_engine_files`."""
        return {"scheduler": self.scheduler.state_dict(), "counters": asdict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.counters = StepCounters(**state["counters"])

    def save_engine_files(self, step_dir: Path) -> None:
        """Every rank writes its ZeRO partition of the model and optimizer into `step_dir`/deepspeed (collective)."""
        self.engine.save_checkpoint(str(step_dir), tag=ENGINE_DIR, save_latest=False)

    def load_engine_files(self, step_dir: Path) -> None:
        """Every rank reads its partition back (collective); no pickled code runs (weights_only_loads)."""
        with weights_only_loads():
            path, _ = self.engine.load_checkpoint(
                str(step_dir), tag=ENGINE_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {step_dir / ENGINE_DIR}")
