"""Muon for the hidden weight matrices and AdamW for the rest, in one optimizer, exact on every parallel layout.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; Liu et al. 2025, "Muon is scalable for LLM
training"), per matrix W with gradient G, as torch.optim.Muon writes it:
    B <- mu*B + (1 - mu)*G                      momentum (an exponential average)
    U <- G + mu*(B - G)  (Nesterov)  or  B
    O <- NS5(U)                                 ~ the orthogonal factor of U's SVD (quintic Newton-Schulz)
    W <- W*(1 - lr*wd) - lr*scale(W)*O          decoupled weight decay; scale = 0.2*sqrt(max(m, n)) (Moonlight)
A stacked expert weight [E, m, n] is E matrices, orthogonalised one by one (batched), never as one [E*m, n].

Newton-Schulz needs the whole matrix, and under FSDP2, TP or HSDP a rank holds a shard. For each matrix the ranks
that share it (the mesh dimensions where it is replicated, or sharded along one of its two matrix dimensions) pick
one owner, balanced by Newton-Schulz cost; every rank gathers the update's full matrix (DTensor redistribute: an
all-gather), only the owner iterates, and the owner's result is broadcast back and sliced to the parameter's own
placement. Shards along an expert dimension (EP) stay where they are: those matrices are whole on their rank. The
momentum and the elementwise steps run on the local shards. Each rank therefore iterates about 1/world of the
matrices, and the layout changes no value: the same fp32 operations on the same full matrix as one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from framework.config import OptimConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic's (a, b, c) of Jordan et al.: X <- a*X + (b*A + c*A^2) X with A = X X^T, tuned for the steepest
slope at 0 (singular values land in about [0.7, 1.2], not exactly 1; it does not hurt training, per the post)."""
NS_EPS = 1e-7
"""Floor of the Frobenius norm the iteration first divides by (so every singular value is <= 1)."""
BUCKET_ELEMENTS = 2**27
"""Full matrices gathered at once (512 MiB in fp32): the gathered copies of one bucket live together."""


def newton_schulz(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """NS5 of the last two dimensions (a batch of matrices for [..., m, n]) in `dtype`; returns `dtype`.

    A tall matrix is iterated transposed, so the Gram matrix X X^T is the small side. For a 2-D input the ops are
    torch.optim.Muon's (addmm), so bfloat16 results match it bit for bit."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    batch = x.shape[:-2]
    if x.ndim > 2:
        x = x.reshape(-1, *x.shape[-2:])
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = mm(x, poly, x, beta=a)  # a*X + poly@X
    x = x.reshape(*batch, *x.shape[-2:])
    return x.mT if tall else x


def lr_scale(shape: torch.Size | tuple[int, ...], rule: str) -> float:
    """The per-matrix learning-rate factor of an update of rows x cols (the last two dimensions)."""
    rows, cols = shape[-2:]
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # an orthogonal update's RMS is 1/sqrt(max): AdamW's ~0.2
    return math.sqrt(max(1.0, rows / cols))


def ns_cost(shape: torch.Size | tuple[int, ...]) -> float:
    """Multiply-adds of one Newton-Schulz iteration over the matrices of `shape`, up to a constant: m*n*min(m, n)."""
    rows, cols = shape[-2:]
    return math.prod(shape[:-2]) * rows * cols * min(rows, cols)


# -- the layout of one matrix ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixLayout:
    """How one sharded matrix parameter is orthogonalised on this rank.

    `gathered` is its placements with every shard of a matrix dimension replaced by Replicate (expert-dimension
    shards stay); `own_dims` are the mesh dimensions whose ranks then hold the same full matrices, and `owner` the
    coordinate along them of the one rank that iterates."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    gathered: tuple[Placement, ...]
    own_dims: tuple[int, ...]
    owner: tuple[int, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @property
    def mine(self) -> bool:
        coordinate = self.mesh.get_coordinate()
        assert coordinate is not None, "a rank outside the parameter's mesh"
        return all(coordinate[d] == o for d, o in zip(self.own_dims, self.owner, strict=True))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The local shard -> this rank's full matrices (all-gather over the matrix-dimension shards)."""
        whole = DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )
        return whole.redistribute(self.mesh, self.gathered).to_local()

    def broadcast(self, full: torch.Tensor) -> None:
        """The owner's `full` to every rank of own_dims, one mesh dimension after the other (after dimension k,
        every rank that agrees with the owner on the dimensions after k holds it)."""
        for d, source in zip(self.own_dims, self.owner, strict=True):
            group = self.mesh.get_group(d)
            dist.broadcast(full, src=dist.get_global_rank(group, source), group=group)

    def scatter(self, full: torch.Tensor) -> torch.Tensor:
        """Full matrices -> this rank's shard in the parameter's own placement (local slicing, no communication)."""
        whole = DTensor.from_local(
            full, self.mesh, self.gathered, run_check=False, shape=self.shape, stride=self.stride
        )
        return whole.redistribute(self.mesh, self.placements).to_local()


def _split_placements(param: DTensor) -> tuple[tuple[Placement, ...], tuple[int, ...]]:
    """(gathered placements, mesh dims sharing each full matrix) of a DTensor parameter."""
    gathered, own = [], []
    for d, placement in enumerate(param.placements):
        # FSDP2 over an already sharded dimension (TP, EP) shards it strided: _StridedShard, no Shard subclass
        shard = placement.is_shard() or isinstance(placement, _StridedShard)
        if placement.is_replicate():
            gathered.append(placement)
            own.append(d)
        elif shard and placement.dim >= param.ndim - 2:  # type: ignore[attr-defined]
            gathered.append(Replicate())
            own.append(d)
        elif shard:
            gathered.append(placement)  # an expert dimension: each rank's matrices are whole
        else:
            raise ValueError(
                f"a Muon parameter is {placement} (partial) on its mesh; expected Shard or Replicate"
            )
    return tuple(gathered), tuple(own)


class OwnerPicker:
    """Assigns each sharded matrix an owner among the ranks that share it: the least-loaded so far, by
    Newton-Schulz cost, so big and small matrices spread evenly. Deterministic: every rank of a mesh sees the same
    parameters in the same order and so makes the same choices."""

    def __init__(self) -> None:
        self._loads: dict[tuple[Any, ...], list[float]] = {}

    def layout(self, param: torch.Tensor) -> MatrixLayout | None:
        if not isinstance(param, DTensor):
            return None  # a whole matrix on this rank (one process, pipeline stages, plain DDP)
        gathered, own = _split_placements(param)
        mesh = param.device_mesh
        sizes = [mesh.size(d) for d in own]
        key = (tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names, own)
        loads = self._loads.setdefault(key, [0.0] * math.prod(sizes))
        index = min(range(len(loads)), key=loads.__getitem__)
        loads[index] += ns_cost(param.shape)
        owner = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), sizes)) if sizes else ()
        return MatrixLayout(mesh, tuple(param.placements), gathered, own, owner, param.shape, param.stride())


class PhaseClock:
    """Seconds per phase of the optimizer step, summed over steps, when `timings` is a dict (benchmarks/muon.py);
    a no-op otherwise. Profiling syncs the device around each phase, so it is off in training."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        """The device's queue, then every rank (so a phase's time is its own, not a wait for a slower rank's
        previous phase: the owners' uneven Newton-Schulz work shows in `iterate`, not in `scatter`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if dist.is_initialized():
            dist.barrier()


def orthogonalize(
    updates: list[torch.Tensor],
    layouts: list[MatrixLayout | None],
    steps: int,
    dtype: torch.dtype,
    clock: PhaseClock | None = None,
) -> list[torch.Tensor]:
    """NS5 of every matrix whose local shard is in `updates`; returns each rank's shard of the results (in the
    updates' dtype). Buckets of about BUCKET_ELEMENTS full elements: gather all, iterate the owned, broadcast."""
    clock = clock or PhaseClock(None, torch.device("cpu"))
    out: list[torch.Tensor] = [torch.empty(0)] * len(updates)
    for bucket in _buckets(updates, layouts):
        with clock.phase("gather"):
            fulls = {i: layout.gather(updates[i]) for i in bucket if (layout := layouts[i]) is not None}
        with clock.phase("iterate"):
            for i in bucket:
                layout = layouts[i]
                if layout is None:
                    out[i] = newton_schulz(updates[i], steps, dtype).to(updates[i].dtype)
                elif layout.mine:
                    # contiguous: a tall matrix's result is a transposed view, and the receivers' buffers are not
                    fulls[i] = newton_schulz(fulls[i], steps, dtype).to(updates[i].dtype).contiguous()
        with clock.phase("scatter"):
            for i, full in fulls.items():
                layout = layouts[i]
                assert layout is not None
                layout.broadcast(full)
                out[i] = layout.scatter(full)
    return out


def _buckets(updates: list[torch.Tensor], layouts: list[MatrixLayout | None]) -> Iterable[list[int]]:
    bucket: list[int] = []
    size = 0
    for i, layout in enumerate(layouts):
        elements = math.prod(layout.shape) if layout is not None else updates[i].numel()
        if bucket and size + elements > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += elements
    if bucket:
        yield bucket


# -- the optimizer -----------------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over param groups marked `algorithm: muon` or `adamw` (framework/train/optim.py's rules).

    The AdamW groups are stepped by torch.optim.AdamW itself, over the same group dicts and state (so their numbers
    and checkpoint state are AdamW's, bit for bit); the Muon groups keep a `momentum_buffer` per parameter, a
    tensor laid out like the parameter (a DTensor under FSDP2/TP), which checkpoints reshard like AdamW's moments.
    """

    def __init__(
        self, groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device, fused: bool
    ) -> None:
        adamw = [g for g in groups if g["algorithm"] == "adamw"]
        # AdamW fills its defaults into these dicts, which this optimizer then holds too
        self._adamw = (
            torch.optim.AdamW(adamw, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
            if adamw
            else None
        )
        super().__init__(groups, {"lr": cfg.lr, "weight_decay": 0.0})
        self._link_adamw()
        muon = cfg.muon
        self.momentum, self.nesterov, self.ns_steps, self.scale_rule = (
            muon.momentum, muon.nesterov, muon.ns_steps, muon.lr_scale,
        )  # fmt: skip
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.ns_dtype = auto if muon.ns_dtype == "auto" else getattr(torch, muon.ns_dtype)
        self.device = device
        self.timings: dict[str, float] | None = None
        """Set to {} to have each step add its seconds per phase (momentum, gather, iterate, scatter, apply,
        adamw); None (training) measures nothing."""
        picker = OwnerPicker()
        self.layouts = {p: picker.layout(p) for g in self._muon_groups() for p in g["params"]}

    def _muon_groups(self) -> list[dict[str, Any]]:
        return [g for g in self.param_groups if g["algorithm"] == "muon"]

    def _link_adamw(self) -> None:
        """Point the inner AdamW at this optimizer's AdamW groups and state (load_state_dict replaces both)."""
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if g["algorithm"] == "adamw"]
            self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link_adamw()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        if self._adamw is not None:
            with PhaseClock(self.timings, self.device).phase("adamw"):
                self._adamw.step()
        clock = PhaseClock(self.timings, self.device)
        params, updates = [], []
        with clock.phase("momentum"):
            for group in self._muon_groups():
                for p in group["params"]:
                    if p.grad is not None:
                        params.append((p, group))
                        updates.append(self._momentum_update(p))
        layouts = [self.layouts[p] for p, _ in params]
        results = orthogonalize(updates, layouts, self.ns_steps, self.ns_dtype, clock)
        with clock.phase("apply"):
            for (p, group), o in zip(params, results, strict=True):
                local = _local(p)
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(o, alpha=-group["lr"] * lr_scale(p.shape, self.scale_rule))

    def _momentum_update(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the matrix to orthogonalise (elementwise, so shard by shard is exact)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        grad, buf = _local(p.grad), _local(state["momentum_buffer"])
        buf.lerp_(grad, 1 - self.momentum)
        return grad.lerp(buf, self.momentum) if self.nesterov else buf.clone()
