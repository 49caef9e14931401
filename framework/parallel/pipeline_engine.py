"""The torch-native engine with a pipeline: each optimizer step runs the recipe's schedule over the micro-batches.

Every pipeline rank of one data-parallel index reads the same batch: the first stage takes the token ids, the last
stage the labels, and every stage the keyword inputs (positions, document ids, prefix lengths: the masks of every
block need them). The loss exists on the last stage only; its sums are added over the pipeline group (zeros
elsewhere) so every rank logs the same numbers and takes the same skip decision. The gradient norm is the norm over
all stages: each rank's squared norm summed over the pipeline group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.config import Recipe
from framework.parallel.dims import ParallelDims
from framework.parallel.engine import DistributedTrainModule
from framework.parallel.pipeline import PipelineParts, build_schedule, no_autocast, pp_sum
from framework.train.loss import compute_loss, count_labelled, loss_sums
from framework.train.train_module import Batch

MODEL_INPUTS = ("input_ids", "labels")


class PipelineTrainModule(DistributedTrainModule):
    """`model` is this rank's part (see framework/parallel/pipeline.py), parallelized; `parts` its stages."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        device: torch.device | str,
        dims: ParallelDims,
        mesh: DeviceMesh,
        parts: PipelineParts,
    ) -> None:
        super().__init__(model, recipe, device, dims, mesh)
        self.parts = parts
        self.holds_first = 0 in parts.stage_ids
        self.holds_last = parts.num_stages - 1 in parts.stage_ids
        self.schedule = build_schedule(parts, recipe, dims, mesh["pp"], self.device, self._loss_fn)
        self._total = torch.ones((), device=self.device)
        self._sums: list[torch.Tensor] = []  # per chunk: [ce, z] (training) or [ce_sum] (evaluation)
        self._parts: dict[int, torch.Tensor] = {}  # id(loss returned to the schedule) -> its logged parts
        self._evaluating = False

    def train_batch(self, micro_batches: list[Batch]) -> dict[str, Any]:
        if not micro_batches:
            raise ValueError("train_batch needs at least one micro-batch")
        self._set_training(True)
        batches = [self._to_device(mb) for mb in micro_batches]
        self._total = self._global_sum(sum(count_labelled(b["labels"]) for b in batches))
        self._sums = []
        with self.precision.autocast():
            for batch in batches:  # gradient accumulation: one schedule run per micro-batch
                self._run(self.schedule.step, batch)
        ce, z = self._last_stage_sums(2)
        tokens = sum(b["input_ids"].numel() for b in batches)
        self.counters.tokens += tokens
        self._pending = (self._global_sum(ce), self._global_sum(z), self._total)
        return {"loss": ce, "z_loss": z, "labelled_tokens": self._total, "tokens": tokens}

    @torch.no_grad()
    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self._set_training(False)
        batch = self._to_device(batch)
        self._sums, self._evaluating = [], True
        try:
            with self.precision.autocast():
                self._run(self.schedule.eval, batch)
        finally:
            self._evaluating = False
        (ce_sum,) = self._last_stage_sums(1)
        return ce_sum, count_labelled(batch["labels"])

    def _run(self, schedule_call: Any, batch: Batch) -> None:
        """One schedule run over `batch` (split into the recipe's pipeline chunks); keeps the chunks' loss parts.

        The losses the schedule hands back identify the real chunks: on its first run a stage also calls the loss
        function once on placeholder tensors to infer gradient shapes, and that call must not be logged."""
        losses: list[torch.Tensor] = []
        schedule_call(*self._args(batch), target=self._target(batch), losses=losses, **_kwargs(batch))
        self._sums += [self._parts[id(loss)] for loss in losses]
        self._parts.clear()

    def _loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Called by the schedule on the last stage for each pipeline chunk."""
        with no_autocast(self.device):
            if self._evaluating:
                loss, _ = loss_sums(logits, labels, with_z=False)
                parts = loss[None]
            else:
                out = compute_loss(logits, labels, self._total, self.recipe.train.z_loss)
                # x dp: FSDP/DDP average gradients over data-parallel ranks, our loss wants their sum (engine.py).
                loss, parts = self.precision.scale(out.loss * self.dims.dp), torch.stack([out.ce, out.z_loss])
        self._parts[id(loss)] = parts.detach()
        return loss

    def _last_stage_sums(self, width: int) -> list[torch.Tensor]:
        """The chunks' loss sums, summed, then over the pipeline group (zeros on ranks without the last stage)."""
        local = torch.stack(self._sums).sum(0) if self._sums else torch.zeros(width, device=self.device)
        return list(pp_sum(local, self.mesh["pp"]).unbind())

    def _grad_norm(self) -> torch.Tensor:
        local = super()._grad_norm()  # this rank's stages, already reduced over dp/tp meshes
        return pp_sum(local.float() ** 2, self.mesh["pp"]).sqrt()

    def _args(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"],) if self.holds_first else ()

    def _target(self, batch: Batch) -> torch.Tensor | None:
        return batch["labels"] if self.holds_last else None


def _kwargs(batch: Batch) -> dict[str, torch.Tensor]:
    """Keyword inputs every stage's forward takes (chunked along the batch like the ids)."""
    return {k: v for k, v in batch.items() if k not in MODEL_INPUTS}
