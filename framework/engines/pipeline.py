"""The torch-native engine with a pipeline: each optimizer step runs the recipe's schedule over the micro-batches.

Every pipeline rank of one data-parallel index reads the same batch: the first stage takes the token ids, the last
stage the labels, and every stage the keyword inputs (positions, document ids, prefix lengths: the masks of every
block need them). The loss exists on the last stage only; its sums are added over the pipeline group (zeros
elsewhere) so every rank logs the same numbers and takes the same skip decision. The gradient norm is the norm over
all stages: each rank's squared norm summed over the pipeline group.

A tied head (Megatron's "embedding group"): the first stage embeds with `tok_embeddings.weight`, the last stage
projects with its own copy of it. Before every update the two copies' gradients are summed (an all-reduce between
each first-stage rank and the last-stage rank of the same data/tensor coordinates), so both apply the same update
and stay identical; the norm counts the weight once (on the first stage). Multi-token prediction (model.mtp) embeds
the tokens ahead on the last stage, so the same rule applies to it with an untied head.

Multi-token prediction: its depths live on the last stage, which gets the token ids as the keyword input
`mtp_input_ids`; the stage stashes each depth's logits in its forward and the loss function, called by the schedule
right after that forward, reads them (framework/train/mtp_loss.py). Their per-depth sums are logged like the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from framework.config import Recipe
from framework.engines.moe_pipeline import PipelineMoE
from framework.engines.native import DistributedTrainModule, _nonfinite_anywhere, _sum_over
from framework.parallel.dims import ParallelDims
from framework.parallel.pipeline import PipelineParts, build_schedule, no_autocast, pp_sum, shares_embedding
from framework.parallel.tensor import loss_context
from framework.train.loss import compute_loss, count_labelled, loss_sums
from framework.train.mtp_loss import mtp_loss, take_mtp_logits
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
        self._tied = _tied_embedding(model, recipe, mesh)
        # MoE: each stage adds its layers' router losses in its own backward (framework/engines/moe_pipeline.py)
        self._moe = self._pipeline_moe()
        self._trained_last = False  # did the last schedule call train? (else torch re-infers shapes first)
        self._qk_inference: set[int] = set()  # stages whose next forward is torch's metadata inference
        self._hook_qk_clip()
        mtp = recipe.model.mtp
        self._mtp_depth = mtp.depth if mtp is not None else 0
        # the module whose forward stashes the MTP logits: the last stage's (a view when a rank runs two stages)
        self._last_module = (
            parts.modules[parts.stage_ids.index(parts.num_stages - 1)] if self.holds_last else None
        )

    def train_batch(self, micro_batches: list[Batch]) -> dict[str, Any]:
        if not micro_batches:
            raise ValueError("train_batch needs at least one micro-batch")
        self._set_training(True)
        if self.qk_clip is not None:
            self.qk_clip.start_step()
            if not self._trained_last:
                self._qk_inference = set(self.parts.stage_ids)
        batches = [self._to_device(mb) for mb in micro_batches]
        self._total = self._global_sum(sum(count_labelled(b["labels"]) for b in batches))
        self._sums = []
        self._start_moe_step(batches)
        with self.precision.autocast():
            for batch in batches:  # gradient accumulation: one schedule run per micro-batch
                self._run(self.schedule.step, batch)
        self._trained_last = True
        if self._moe is not None:
            self._moe.finish_step()
        self._sync_tied_grads()
        ce, z, *mtp = self._last_stage_sums(2 + self._mtp_depth)
        tokens = sum(b["input_ids"].numel() for b in batches)
        self.counters.tokens += tokens
        self._pending = (self._global_sum(ce), self._global_sum(z), self._total)
        self._mtp_pending = self._global_sum(torch.stack(mtp)) if mtp else None
        return {"loss": ce, "z_loss": z, "labelled_tokens": self._total, "tokens": tokens}

    @torch.no_grad()
    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self._set_training(False)
        batch = self._to_device(batch)
        self._sums, self._evaluating, self._trained_last = [], True, False
        try:
            with self.precision.autocast():
                self._run(self.schedule.eval, batch)
        finally:
            self._evaluating = False
        (ce_sum,) = self._last_stage_sums(1)
        # with cp each rank scored its sequence shard: the batch's sums, the same on every cp peer (engine.py)
        return _sum_over(ce_sum, self.mesh, ("cp",)), _sum_over(
            count_labelled(batch["labels"]), self.mesh, ("cp",)
        )

    def _run(self, schedule_call: Any, batch: Batch) -> None:
        """One schedule run over `batch` (split into the recipe's pipeline chunks); keeps the chunks' loss parts.

        The losses the schedule hands back identify the real chunks: on its first run a stage also calls the loss
        function once on placeholder tensors to infer gradient shapes, and that call must not be logged."""
        losses: list[torch.Tensor] = []
        # Vocab-parallel logits: the loss's forward and backward (inside the schedule) run under loss_parallel.
        with loss_context(self.dims, self.recipe):
            kwargs = _kwargs(batch, mtp=self._mtp_depth > 0)
            schedule_call(*self._args(batch), target=self._target(batch), losses=losses, **kwargs)
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
                parts = torch.stack([out.ce, out.z_loss])
                mtp_logits = take_mtp_logits(self._last_module) if self._last_module is not None else None
                if mtp_logits is not None:  # this chunk's stash: its forward just ran (module docstring)
                    weight = self.recipe.model.mtp.loss_weight
                    extra = mtp_loss(mtp_logits, labels, self._total, weight)
                    out.loss, parts = out.loss + extra.loss, torch.cat([parts, extra.depths])
                # x dp x cp: FSDP/DDP average gradients over those ranks, our loss wants their sum (engine.py).
                loss = self.precision.scale(out.loss * self.dims.dp * self.dims.cp)
        self._parts[id(loss)] = parts.detach()
        return loss

    def _hook_qk_clip(self) -> None:
        """QK-clip's max logits must not see torch's metadata-inference forward: a later stage runs it on empty
        (uninitialised) placeholders. It is each stage's first forward of a schedule call after no training call
        (the rule framework/engines/moe_pipeline.py states), so that forward runs with the probe off."""
        if self.qk_clip is None:
            return
        tracked = set(map(id, self.qk_clip.modules.values()))
        for stage, module in zip(self.parts.stage_ids, self.parts.modules, strict=True):
            attention = [m for m in module.modules() if id(m) in tracked]

            def before(_: nn.Module, __: Any, stage: int = stage, attention: list = attention) -> None:
                inference = stage in self._qk_inference
                self._qk_inference.discard(stage)
                for m in attention:
                    m.track_logits = not inference

            module.register_forward_pre_hook(before)

    def _pipeline_moe(self) -> PipelineMoE | None:
        if self.recipe.model.moe is None:
            return None

        def scale(loss: torch.Tensor) -> torch.Tensor:  # as _loss_fn scales the last stage's loss
            return self.precision.scale(loss * self.dims.dp * self.dims.cp)

        moe = PipelineMoE(self.moe, self.recipe.model, self.mesh["pp"], scale, self.device)
        moe.install(self.parts)
        return moe

    def _start_moe_step(self, batches: list[Batch]) -> None:
        if self._moe is not None:
            chunks = self.recipe.parallel.pp_microbatches or self.dims.pp_stages
            self._moe.start_step([b["input_ids"] for b in batches], chunks)
            if not self._trained_last:
                self._moe.expect_inference()

    def _moe_metrics(self) -> dict[str, Any]:
        return self._moe.metrics() if self._moe is not None else {}

    def _last_stage_sums(self, width: int) -> list[torch.Tensor]:
        """The chunks' loss sums, summed, then over the pipeline group (zeros on ranks without the last stage)."""
        local = torch.stack(self._sums).sum(0) if self._sums else torch.zeros(width, device=self.device)
        return list(pp_sum(local, self.mesh["pp"]).unbind())

    def _grad_norm(self) -> torch.Tensor:
        """This rank's stages (each layout reduced over its dp/tp mesh, as the base engine does), then the
        squares summed over the pipeline. The last stage's copy of a tied embedding is not counted again."""
        again = self._tied[0] if self._tied is not None and not self.holds_first else None
        local = self._local_norm(skip=again)
        # plain replicated gradients (tp) are normed per rank: one skip decision for the world (engine.py)
        return _nonfinite_anywhere(pp_sum(local.float() ** 2, self.mesh["pp"]).sqrt())

    def _sync_tied_grads(self) -> None:
        if self._tied is None or self._tied[0].grad is None:
            return
        param, group = self._tied
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        dist.all_reduce(grad, group=group)  # in place: to_local() shares the DTensor's storage

    def _args(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"],) if self.holds_first else ()

    def _target(self, batch: Batch) -> torch.Tensor | None:
        return batch["labels"] if self.holds_last else None


def _tied_embedding(
    model: nn.Module, recipe: Recipe, mesh: DeviceMesh
) -> tuple[torch.Tensor, dist.ProcessGroup] | None:
    """(the tied weight, the group of its two copies) on first- and last-stage ranks of a tied model (or one with
    multi-token prediction, whose last stage embeds too), else None.
    Every rank must take part in creating the groups, also those that hold no copy."""
    if not shares_embedding(recipe) or mesh["pp"].size() == 1:
        return None
    ranks = mesh.mesh  # [pp, dp_replicate, dp_shard, cp, tp] global ranks
    pairs = [
        list(pair) for pair in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist(), strict=True)
    ]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    embeddings = getattr(model, "tok_embeddings", None)
    return (embeddings.weight, group) if embeddings is not None and group is not None else None


def _kwargs(batch: Batch, mtp: bool = False) -> dict[str, torch.Tensor]:
    """Keyword inputs every stage's forward takes (chunked along the batch like the ids); with multi-token
    prediction also the token ids, for the last stage's MTP depths (`mtp_input_ids`)."""
    kwargs = {k: v for k, v in batch.items() if k not in MODEL_INPUTS}
    if mtp:
        kwargs["mtp_input_ids"] = batch["input_ids"]
    return kwargs
