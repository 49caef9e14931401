"""The engine behind the training loop: forward/backward with accumulation, the optimizer step and its guards.

`BaseTrainModule` is the interface the Trainer and its callbacks use; `TrainModule` implements it for one process
on one device. Parallel engines (FSDP/TP over a device mesh, DeepSpeed) implement the same interface; the seams
they override here are `_global_sum` (all-reduce of token counts and losses), `_grad_sync` (no gradient all-reduce
on all but the last micro-batch) and `_grad_norm` (norm over sharded gradients).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from framework.config import Recipe
from framework.train.loss import LossOutput, compute_loss, count_labelled, loss_sums
from framework.train.moe_loss import MoEBalancer
from framework.train.mtp_loss import mtp_loss, mtp_metrics, take_mtp_logits
from framework.train.optim import build_optimizer
from framework.train.precision import Precision
from framework.train.qk_clip import QKClip
from framework.train.schedule import build_scheduler, scheduler_state_for

Batch = dict[str, torch.Tensor]
StepVeto = Callable[[dict[str, Any]], str | None]
"""Called between backward and the update with the step's host stats; returns a skip reason or None."""


def resolve_device(name: str) -> torch.device:
    """train.device -> a concrete device ('auto' = CUDA when available; 'cuda' = the current CUDA device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


@dataclass
class StepCounters:
    """step: optimizer steps attempted (train.steps counts these); updates: applied; tokens: input tokens seen."""

    step: int = 0
    updates: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    tokens: int = 0


class BaseTrainModule(abc.ABC):
    """What the Trainer needs from an engine. All counts are for this process (rank)."""

    device: torch.device
    rng_seed: int
    """Seed of torch's default generators (dropout) for this rank; the Trainer seeds them with it on a fresh run."""

    @property
    @abc.abstractmethod
    def step(self) -> int:
        """Optimizer steps taken so far (applied or skipped)."""

    @property
    @abc.abstractmethod
    def tokens(self) -> int:
        """Input tokens processed so far."""

    @abc.abstractmethod
    def train_batch(self, micro_batches: list[Batch]) -> dict[str, Any]:
        """Forward and backward over the micro-batches of one optimizer step (gradients accumulate)."""

    @abc.abstractmethod
    def optim_step(self, veto: StepVeto | None = None) -> dict[str, Any]:
        """Apply (or skip) the update for the accumulated gradients; returns the step's metrics."""

    @abc.abstractmethod
    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, labelled tokens) of one held-out batch, as device tensors."""

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the data-parallel ranks (one process: `value` itself). Collective: every rank
        calls it. Validation adds up the sums of the held-out batches each data-parallel rank evaluated."""
        return value

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: nested dicts of tensors and JSON-able values."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


class TrainModule(BaseTrainModule):
    """Single-process engine: `model` must already live on `device` (built, materialised and initialised)."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N, not cuda
        _check_on_device(model, self.device)
        self.model = model
        self.recipe = recipe
        self.precision = Precision(recipe.precision, self.device)
        self.rng_seed = recipe.train.seed
        self.optimizer = build_optimizer(model, recipe.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule, recipe.train.steps)
        self.counters = StepCounters()
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        # Optimizer state is saved keyed by parameter name (FQN), in the optimizer's own parameter order.
        self._param_names = [names[id(p)] for p in self._params]
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._mtp_pending: torch.Tensor | None = None
        """The step's per-depth MTP losses [D], summed over micro-batches and ranks (None without model.mtp)."""
        # MoE router losses, load metrics and selection-bias updates (None for dense models).
        self.moe = MoEBalancer.for_model(model, recipe.model.moe, self._global_sum, self._shard_sum)
        # QK-clip (optim.qk_clip): the heads' max logits of each step, rescaled after the update (None when off)
        self.qk_clip = QKClip.for_recipe(model, recipe.model, recipe.optim.qk_clip, self._world_max)
        self._qk_report: dict[str, Any] = {}

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def tokens(self) -> int:
        return self.counters.tokens

    @property
    def lr(self) -> float:
        """Learning rate the next update will use."""
        return self.optimizer.param_groups[0]["lr"]

    def train_batch(self, micro_batches: list[Batch]) -> dict[str, Any]:
        if not micro_batches:
            raise ValueError("train_batch needs at least one micro-batch")
        self._set_training(True)
        if self.qk_clip is not None:
            self.qk_clip.start_step()
        batches = [self._to_device(mb) for mb in micro_batches]
        # Normaliser of every micro-batch: labelled tokens of the whole global batch, counted before any backward.
        total = self._global_sum(sum(count_labelled(b["labels"]) for b in batches))
        if self.moe is not None:
            self.moe.start_step([b["input_ids"].shape for b in batches])
        ce = z = torch.zeros((), device=self.device)
        mtp: torch.Tensor | None = None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with self._grad_sync(last=last):
                out = self._forward_loss(batch, total)
                self._backward(out.loss, last)
            ce, z = ce + out.ce, z + out.z_loss
            if out.mtp is not None:
                mtp = out.mtp if mtp is None else mtp + out.mtp
        self._mtp_pending = self._global_sum(mtp) if mtp is not None else None
        tokens = sum(b["input_ids"].numel() for b in batches)
        self.counters.tokens += tokens
        self._pending = (self._global_sum(ce), self._global_sum(z), total)
        return {"loss": ce, "z_loss": z, "labelled_tokens": total, "tokens": tokens}

    def optim_step(self, veto: StepVeto | None = None) -> dict[str, Any]:
        if self._pending is None:
            raise RuntimeError("optim_step() called without a train_batch() since the last step")
        ce, z, labelled = self._pending
        self._pending = None
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # true gradients from here on: norms and clipping see real values
        norm = self._grad_norm()
        # The one host sync of the step: the skip decision and the logs need these numbers on the host.
        mtp = self._mtp_pending if self._mtp_pending is not None else ce.new_zeros(0)
        self._mtp_pending = None
        head = torch.stack([ce, z, labelled.float(), norm.float()])
        values = torch.cat([head, mtp.float()]).tolist()
        loss, z_loss, n_labelled, grad_norm = values[:4]
        stats = {"step": self.step + 1, "loss": loss, "z_loss": z_loss, "grad_norm": grad_norm}
        if len(values) > 4:
            stats.update(mtp_metrics(values[4:]))  # multi-token prediction, logged on its own
        stats.update(self._moe_metrics())
        lr = self.lr
        reason = self._skip_reason(stats, veto)
        if reason is None:
            self._apply_update(norm)
        else:
            self._skip_update()
        if scaler is not None:
            scaler.update()  # backs off when unscale_ found inf/NaN, else counts towards growth
        self.counters.step += 1
        report, self._qk_report = self._qk_report, {}
        return {**stats, **self._step_report(lr, reason), **report, "labelled_tokens": int(n_labelled)}

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self._global_sum(value)

    @torch.no_grad()
    def eval_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self._set_training(False)
        batch = self._to_device(batch)
        ce_sum, _ = loss_sums(self._forward(batch), batch["labels"], with_z=False)
        return ce_sum, count_labelled(batch["labels"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self._optimizer_state_by_name(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "counters": asdict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(self._optimizer_state_by_index(state["optimizer"]))
        self.scheduler.load_state_dict(
            scheduler_state_for(state["scheduler"], len(self.optimizer.param_groups))
        )
        self.precision.load_state_dict(state["precision"])
        self.counters = StepCounters(**state["counters"])

    # -- steps ---------------------------------------------------------------------------------------------

    def _forward(self, batch: Batch) -> torch.Tensor:
        kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        with self.precision.autocast():
            return self.model(batch["input_ids"], **kwargs)

    def _forward_loss(self, batch: Batch, total_labelled: torch.Tensor) -> LossOutput:
        # The loss runs outside autocast, in fp32 (loss_sums upcasts the logits).
        out = compute_loss(self._forward(batch), batch["labels"], total_labelled, self.recipe.train.z_loss)
        mtp_logits = take_mtp_logits(self.model)
        if mtp_logits is not None:  # multi-token prediction: + loss_weight x mean over depths
            extra = mtp_loss(mtp_logits, batch["labels"], total_labelled, self.recipe.model.mtp.loss_weight)
            out.loss, out.mtp = out.loss + extra.loss, extra.depths
        if self.moe is not None:
            out.loss = out.loss + self.moe.micro_batch_loss()  # router aux + z losses; logged by metrics()
        return out

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss (`last`: the step's final micro-batch); fp16 scales it first."""
        self.precision.scale(loss).backward()

    def _skip_reason(self, stats: dict[str, Any], veto: StepVeto | None) -> str | None:
        finite = all(math.isfinite(stats[k]) for k in ("loss", "z_loss", "grad_norm"))
        # fp16 must skip overflowed steps whatever the recipe says: that is how dynamic loss scaling works.
        if not finite and (self.recipe.train.skip_nonfinite or self.precision.scaler is not None):
            return "nonfinite"
        return veto(stats) if veto is not None and finite else None

    def _apply_update(self, norm: torch.Tensor) -> None:
        clip = self.recipe.optim.grad_clip
        if clip > 0:
            # Scales every gradient by min(1, clip / (norm + 1e-6)), using the norm already computed.
            self._clip_grads(clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.qk_clip is not None:
            self._qk_report = self.qk_clip.apply()  # a second host sync: the clipped-head count for the logs
        if self.moe is not None:
            self.moe.update_bias()  # aux-loss-free balancing uses the load of the step just applied
        # The schedule advances with applied updates only, so a skip leaves the optimizer untouched (LR included).
        self.scheduler.step()
        self.counters.updates += 1
        self.counters.consecutive_skips = 0

    def _skip_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.skipped_steps += 1
        self.counters.consecutive_skips += 1

    def _step_report(self, lr: float, reason: str | None) -> dict[str, Any]:
        scaler = self.precision.scaler
        return {
            "lr": lr,
            "skipped": reason is not None,
            "skip_reason": reason,
            "skipped_steps": self.counters.skipped_steps,
            "consecutive_skips": self.counters.consecutive_skips,
            "updates": self.counters.updates,
            "tokens": self.counters.tokens,
            # get_scale() syncs; only fp16 has a scale to report.
            "loss_scale": scaler.get_scale() if scaler is not None else None,
        }

    # -- seams for parallel engines ------------------------------------------------------------------------

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (one process: the value itself)."""
        return value

    def _shard_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks holding other shards of the same sequences (context parallel; one process: itself)."""
        return value

    def _world_max(self, value: torch.Tensor) -> None:
        """Max over every rank, in place (one process: nothing to do)."""

    def _moe_metrics(self) -> dict[str, Any]:
        """The step's MoE router losses and load metrics (a seam: pipeline stages combine their layers')."""
        return self.moe.metrics() if self.moe is not None else {}

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's backward (DDP: no_sync() unless `last`)."""
        return contextlib.nullcontext()

    def _clip_grads(self, clip: float, norm: torch.Tensor) -> None:
        """Scale every gradient by min(1, clip / (norm + 1e-6)) (a seam: sharded engines group their layouts)."""
        torch.nn.utils.clip_grads_with_norm_(self._params, clip, norm)

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm over all gradients (inf/NaN when any gradient is non-finite)."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)

    # -- helpers -------------------------------------------------------------------------------------------

    def _set_training(self, mode: bool) -> None:
        if self.model.training != mode:
            self.model.train(mode)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _optimizer_state_by_name(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()  # parameters indexed 0..n-1 in param-group order
        names = self._param_names
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        return {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}

    def _optimizer_state_by_index(self, state: dict[str, Any]) -> dict[str, Any]:
        """The saved state keyed back by this optimizer's parameter indices. Only this rank's parameters are
        taken (a checkpoint of another layout names others too, e.g. other pipeline stages); each live group
        takes the hyperparameters of the saved group with the same weight decay (a stage may lack a group)."""
        index = {name: i for i, name in enumerate(self._param_names)}
        groups, start = [], 0
        for number, current in enumerate(self.optimizer.param_groups):
            saved = _matching_group(current, state["param_groups"], number)
            count = len(current["params"])
            groups.append(_like(current, {**saved, "params": list(range(start, start + count))}))
            start += count
        return {
            "state": {index[n]: s for n, s in state["state"].items() if n in index},
            "param_groups": groups,
        }


def _matching_group(current: dict[str, Any], saved: list[dict[str, Any]], number: int) -> dict[str, Any]:
    """The saved group whose hyperparameters this live group takes: the first with the same algorithm (muon or
    adamw) and weight decay. Groups
    of one decay class differ only in parameter layout, which another layout splits differently (TP alone keeps
    plain and DTensor groups apart, FSDP has one), so any of them holds the same values."""

    def kind(g: dict[str, Any]) -> tuple[Any, Any]:
        return g.get("algorithm", "adamw"), g.get("weight_decay")  # AdamW-only runs save no algorithm

    same = [g for g in saved if kind(g) == kind(current)]
    return same[0] if same else saved[min(number, len(saved) - 1)]


def _like(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """Saved param-group values, with tuples restored where the live group has tuples (JSON turns them to lists)."""
    return {
        k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
        for k, v in saved.items()
    }


def _check_on_device(model: nn.Module, device: torch.device) -> None:
    for name, tensor in _named_tensors(model):
        if tensor.device != device:
            raise ValueError(
                f"model tensor {name!r} is on {tensor.device} but the TrainModule runs on {device}; "
                "materialise the model there first (to_empty(device=...) then init_weights)"
            )


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
