"""MoE router losses and metrics under pipeline parallelism.

One process adds every MoE layer's router losses (aux + z, framework/train/moe_loss.py) to the loss after the
forward. In a pipeline the loss exists on the last stage only, so each stage adds its own layers' losses to its own
backward instead: a forward hook on every stage module computes, for the chunk just forwarded, the sum of its MoE
layers' losses divided by the number of MoE layers in the whole model (one process averages over layers), and
attaches it to the stage's output with `_AddLossGradient` — identity in forward; in backward it passes the output's
gradient through and gives the attached loss gradient 1 (Megatron-LM's MoEAuxLossAutoScaler). The attached loss is
scaled as the last stage scales its loss (x dp x cp, then the fp16 loss scale: engines/pipeline.py), so a router
weight's gradient is one process's.

Chunks. The schedule splits each micro-batch into pipeline chunks and every stage forwards them in order, so the
balancer sees each chunk as one micro-batch (`start_step` gets the chunks' shapes): a one-process run with the same
chunks as micro-batches has the same statistics for every aux-loss scope.

torch's metadata inference. The first training schedule call, and the first after an evaluation (torch 2.13
re-initialises the stages when the schedule switches between train and eval), forwards each stage once on
placeholder tensors before the real chunks (`_initialize_pp_stages`). That forward is not a chunk: its router
statistics must not be counted, so the engine announces such calls (`expect_inference`) and the hook lets the first
forward of each stage pass untouched.

Metrics. A stage knows its own layers only: every rank fills its layers' rows of a table over all MoE layers of the
model (zeros elsewhere), the table is summed over the pipeline group, and the logged numbers come from the whole
table, the same on every rank and equal to one process's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.config import ModelConfig
from framework.models.moe import MoE, moe_layers
from framework.models.mtp import mtp_block_index
from framework.parallel.pipeline import PipelineParts, pp_sum
from framework.train.moe_loss import MoEBalancer, summarize

ROW_WIDTH = 4
"""Columns of MoEBalancer.layer_stats rows: aux loss, z loss, router entropy, dropped assignments."""


class _AddLossGradient(torch.autograd.Function):
    """Identity on `x`; backward returns x's gradient unchanged and gradient 1 for `loss` (so `loss` is added to
    whatever loss the backward started from)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, loss: torch.Tensor
    ) -> torch.Tensor:
        ctx.like = (loss.dtype, loss.device)
        # a copy, not a view: the zero-bubble schedules detach stage outputs in place, which views refuse
        return x.clone()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = ctx.like
        return grad, torch.ones((), dtype=dtype, device=device)


class PipelineMoE:
    """The router losses, statistics and metrics of one pipeline rank's MoE layers (module docstring)."""

    def __init__(
        self,
        balancer: MoEBalancer | None,
        model: ModelConfig,
        pp_mesh: DeviceMesh,
        scale_loss: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self.balancer = balancer
        self.device = device
        self.pp_mesh = pp_mesh
        self.scale_loss = scale_loss
        self.row_of = {block: row for row, block in enumerate(moe_block_indices(model))}
        self.n_layers = model.n_layers
        self.n_experts = model.moe.n_experts if model.moe is not None else 0
        self._inference: set[int] = set()
        self._hooked: set[int] = set()  # stages of this rank holding MoE layers
        self._chunks_seen: dict[int, int] = {}  # stage -> chunks whose router losses were added this step
        self._chunks = 0

    def install(self, parts: PipelineParts) -> None:
        """A forward hook on every stage module of this rank that holds MoE layers."""
        for module, stage in zip(parts.modules, parts.stage_ids, strict=True):
            layers = moe_layers(module)
            if layers and self.balancer is not None:
                module.register_forward_hook(self._hook(stage, layers))
                self._hooked.add(stage)

    def expect_inference(self) -> None:
        """The next schedule call starts with torch's metadata-inference forward of each stage (module docstring)."""
        self._inference = set(self._hooked)

    def start_step(self, micro_batches: list[torch.Tensor], chunks: int) -> None:
        """Before a step's first schedule call: the input ids of its micro-batches, split into `chunks` each."""
        if self.balancer is not None:
            self.balancer.start_step([c.shape for ids in micro_batches for c in ids.tensor_split(chunks)])
        self._chunks, self._chunks_seen = len(micro_batches) * chunks, {}

    def finish_step(self) -> None:
        """After a step's schedule calls: every stage added the router losses of every chunk exactly once. Guards
        the shape-inference rule of the module docstring (a torch that infers at other times would otherwise shift
        or drop a chunk's statistics silently)."""
        wrong = {s: n for s, n in self._chunks_seen.items() if n != self._chunks}
        if wrong or self._inference:
            raise RuntimeError(
                f"MoE router losses: stages {wrong} counted chunks instead of {self._chunks} (announced shape "
                f"inference not seen: {sorted(self._inference)}); torch.distributed.pipelining's stage "
                "initialisation changed (framework/engines/moe_pipeline.py)"
            )

    def _hook(self, stage: int, layers: dict[str, MoE]) -> Callable[..., Any]:
        def add_router_losses(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled() or self.balancer is None:
                return None  # evaluation (and its metadata inference): no router losses
            if stage in self._inference:
                self._inference.discard(stage)
                for layer in layers.values():
                    layer.last_routing = None
                return None
            self._chunks_seen[stage] = self._chunks_seen.get(stage, 0) + 1
            losses = [self.balancer.layer_loss(name, layer) for name, layer in layers.items()]
            loss = torch.stack(losses).sum() / len(self.row_of)
            return _AddLossGradient.apply(output, self.scale_loss(loss))

        return add_router_losses

    def metrics(self) -> dict[str, Any]:
        """The step's MoE metrics over every MoE layer of the model (collective over the pipeline group)."""
        rows = torch.zeros(len(self.row_of), ROW_WIDTH, device=self.device)
        counts = torch.zeros(len(self.row_of), self.n_experts, dtype=torch.long, device=self.device)
        if self.balancer is not None and self.balancer.layers:
            names, local_rows, local_counts = self.balancer.layer_stats()
            index = [self.row_of[block_index(name, self.n_layers)] for name in names]
            rows[index], counts[index] = local_rows.to(rows.dtype), local_counts
        return summarize(pp_sum(rows, self.pp_mesh), pp_sum(counts, self.pp_mesh))


def moe_block_indices(model: ModelConfig) -> list[int]:
    """Indices of the MoE blocks: the main stack's, then the multi-token prediction depths' (n_layers + k - 1)."""
    depth = model.mtp.depth if model.mtp is not None else 0
    extra = [mtp_block_index(model, k) for k in range(1, depth + 1)]
    return model.moe_layers + [i for i in extra if model.is_moe_layer(i)]


def block_index(name: str, n_layers: int) -> int:
    """The block index in a module name such as 'layers.3.feed_forward' (or 'mtp.0.block.feed_forward': the MTP
    depth's block index, n_layers + 0)."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return n_layers + int(parts[1])
    return int(parts[parts.index("layers") + 1])
