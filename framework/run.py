"""The path of one run: build (model, data, train module, callbacks) -> fit. `loom train` calls `train`."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.config.schema import ModelConfig, Recipe
from framework.data import Tokenizer, TrainSource, ValidationSource, build_data
from framework.engines.build import train_module_for
from framework.kernels.choice import resolve_kernels, use_kernels
from framework.kernels.fp8 import apply_fp8, check_fp8
from framework.kernels.te import te_importable
from framework.models import build_model, init_weights
from framework.models.flops import flops_per_token
from framework.models.memory import check_fits
from framework.parallel.dims import ParallelDims, build_mesh
from framework.parallel.init import init_sharded_weights
from framework.parallel.parallelize import apply_compile, parallelize
from framework.run_dir import LAUNCHED_ENV, guard_run_dir
from framework.train import Trainer, TrainModule, default_callbacks, resolve_device
from framework.train.callbacks.wandb_logger import check_wandb
from framework.train.determinism import deterministic_run

log = logging.getLogger(__name__)


def world_size_of_run() -> int:
    """Processes in this run (torchrun sets WORLD_SIZE; a plain process is a world of one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _warn_ignored_layout(recipe: Recipe) -> None:
    p = recipe.parallel
    sizes = {
        "dp_replicate": p.dp_replicate,
        "dp_shard": p.dp_shard,
        "tp": p.tp,
        "pp": p.pp,
        "cp": p.cp,
        "ep": p.ep,
    }
    ignored = [f"parallel.{k}={v}" for k, v in sizes.items() if v > 1]
    if ignored:
        warnings.warn(
            f"one process: {', '.join(ignored)} not applied (launch with --nproc N to use the layout)",
            stacklevel=3,
        )


def layout_of(dims: ParallelDims, world_size: int) -> dict[str, int]:
    """The parallel sizes a checkpoint records (compared on resume: RNG states carry over only on the same)."""
    sizes = {"pp": dims.pp, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "cp": dims.cp}
    return {"world_size": world_size, **sizes, "tp": dims.tp, "ep": dims.ep}


def materialize_model(cfg: ModelConfig, device: torch.device, seed: int) -> nn.Module:
    """Build on the meta device (no memory, no init work), allocate on `device`, then initialise every tensor
    from (seed, parameter name) so any later layout holds the same weights."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device=device)
    init_weights(model, cfg, seed)
    return model


def build_parallel_model(
    recipe: Recipe, dims: ParallelDims, mesh: DeviceMesh, device: torch.device
) -> nn.Module:
    """The model laid out over `mesh`, each rank holding only its shards: built on meta, parallelized while it has
    no storage (TP plans and FSDP2 turn meta parameters into meta DTensors), allocated with `to_empty`, then each
    rank's shards initialised from (seed, parameter name), equal to `materialize_model`'s weights bitwise.
    A rank never holds the whole model, so a model larger than one device's memory can be built."""
    with torch.device("meta"):
        model = build_model(recipe.model)
    model = parallelize(model, dims, mesh, recipe)
    model.to_empty(device=device)
    init_sharded_weights(model, recipe.model, recipe.train.seed)
    return model


def train(
    recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, accept_data_change: bool = False
) -> dict[str, Any]:
    """Train `recipe` in this process; returns the last step's metrics. The run directory is checked and locked
    first (framework/run_dir.py) unless Loom's launcher did that for this worker; `overwrite` moves an old run
    there aside; `accept_data_change` lets a resume change what data comes next (docs/checkpoints.md)."""
    _preflight(recipe)  # checks that need no run directory: a refusal here creates nothing
    with _run_dir_guard(recipe, resume, overwrite, accept_data_change):
        return _train_guarded(recipe, resume=resume, accept_data_change=accept_data_change)


def _preflight(recipe: Recipe) -> None:
    """The recipe against this machine, before the run directory is created or locked."""
    device = resolve_device(recipe.train.device)
    announce_kernels(
        recipe, device
    )  # model.kernels meets the device: a ConfigError before any model is built
    announce_precision(recipe, device)  # precision.dtype auto -> the concrete dtype, before anything reads it
    check_fp8(recipe, device)  # likewise precision.dtype fp8 (torchao / TE installed, fp8-capable GPU)
    # sizes against the device's memory, before allocating anything
    check_fits(recipe, world_size_of_run(), str(device))
    check_wandb(recipe.logging.wandb)  # logging.wandb on without the wandb package


KERNEL_LIBRARIES = {
    "te": "transformer_engine DotProductAttention",
    "torch": "torch SDPA / FlexAttention",
}


def announce_kernels(recipe: Recipe, device: torch.device) -> str:
    """Resolve model.kernels and, on CUDA (where auto has a choice to make), print it on rank 0 in the run's
    first lines: auto never switches to Transformer Engine silently. Returns the choice."""
    kernels = resolve_kernels(recipe, device, te_importable)
    if device.type == "cuda" and int(os.environ.get("RANK", "0")) == 0:
        line = f"kernels: {kernels} ({KERNEL_LIBRARIES[kernels]}; model.kernels: {recipe.model.kernels})"
        print(line, flush=True)
    return kernels


def announce_precision(recipe: Recipe, device: torch.device) -> str:
    """Resolve precision.dtype in place (auto: bf16 on CUDA, fp32 elsewhere) and, on CUDA, set TF32 matmuls
    for what stays fp32 (precision.tf32) and print both on rank 0. Returns the printed line ('' off CUDA).

    TF32 is a process-wide torch setting, which is why it is set here, once, at the start of a run."""
    chosen = recipe.precision.dtype
    recipe.precision.dtype = recipe.precision.resolved_dtype(device.type)
    if device.type != "cuda":
        return ""
    if recipe.precision.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls (cuBLAS and cuDNN)
    compute = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling"}
    fp32_matmuls = "TF32" if recipe.precision.tf32 else "full fp32"
    what = compute.get(recipe.precision.dtype, "fp8 matmuls in bf16 autocast")
    line = f"precision: {what}, fp32 matmuls in {fp32_matmuls} (precision.dtype: {chosen})"
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)
    return line


def _run_dir_guard(
    recipe: Recipe, resume: str | None, overwrite: bool, accept_data_change: bool
) -> contextlib.AbstractContextManager:
    """The run-dir guard for the process that owns the run: a plain process, or rank 0 started by something other
    than Loom's launcher (e.g. torchrun directly); nothing for a worker whose launcher holds it already."""
    owner = int(os.environ.get("RANK", "0")) == 0 and not os.environ.get(LAUNCHED_ENV)
    if not owner:
        return contextlib.nullcontext()
    return guard_run_dir(recipe, resume=resume, overwrite=overwrite, accept_data_change=accept_data_change)


def _train_guarded(recipe: Recipe, *, resume: str | None, accept_data_change: bool) -> dict[str, Any]:
    world_size = world_size_of_run()
    device = resolve_device(recipe.train.device)
    if recipe.parallel.engine == "deepspeed":
        return train_deepspeed(
            recipe, device, world_size, resume=resume, accept_data_change=accept_data_change
        )
    if world_size == 1:
        # One process trains the whole model; the recipe's parallel section (written for a cluster, e.g. ep: 8)
        # is not applied, so any recipe can be tried on one machine — but say so, never silently.
        _warn_ignored_layout(recipe)
        return _train(
            recipe, device, _single_module, dp_rank=0, dp_size=1, rank=0, resume=resume, layout=None,
            accept_data_change=accept_data_change,
        )  # fmt: skip
    # Every layout rule is checked before any process-group work: a bad layout is one ConfigError, exit 2.
    dims = ParallelDims.from_recipe(recipe, world_size)
    with process_group(device) as device:
        return train_distributed(recipe, dims, device, resume=resume, accept_data_change=accept_data_change)


def train_distributed(
    recipe: Recipe,
    dims: ParallelDims,
    device: torch.device,
    *,
    resume: str | None = None,
    accept_data_change: bool = False,
) -> dict[str, Any]:
    """Train `recipe` as this rank of the initialised default process group, laid out as `dims`."""
    mesh = build_mesh(dims, device.type)
    log.info("layout: %s; %s", dims.describe(), describe_rank(mesh))
    log_node_map()
    module = functools.partial(_distributed_module, dims=dims, mesh=mesh)
    dp_rank = mesh["dp_replicate"].get_local_rank() * dims.dp_shard + mesh["dp_shard"].get_local_rank()
    return _train(
        recipe,
        device,
        module,
        dp_rank=dp_rank,
        dp_size=dims.dp,
        rank=dist.get_rank(),
        resume=resume,
        layout=layout_of(dims, dims.world_size),
        accept_data_change=accept_data_change,
    )


def train_deepspeed(
    recipe: Recipe,
    device: torch.device,
    world_size: int,
    *,
    resume: str | None = None,
    accept_data_change: bool = False,
) -> dict[str, Any]:
    """Train `recipe` on the DeepSpeed engine: every rank a data-parallel rank (docs/deepspeed.md)."""
    ds_config = importlib.import_module("framework.deepspeed.config")
    ds_config.check_deepspeed(
        recipe, world_size, resume, device
    )  # every refusal before any process-group work
    if world_size == 1:  # one process (e.g. one GPU with ZeRO offload): DeepSpeed still wants a process group
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    with process_group(device) as device:
        rank, cp = dist.get_rank(), recipe.parallel.cp
        layout = {"world_size": world_size, "engine": "deepspeed", "zero_stage": recipe.deepspeed.zero_stage}
        layout["cp"] = cp
        # sequence groups are blocks of cp consecutive ranks: a block reads one data-parallel slice
        return _train(recipe, device, _deepspeed_module, dp_rank=rank // cp, dp_size=world_size // cp,
                      rank=rank, resume=resume, layout=layout,
                      accept_data_change=accept_data_change)  # fmt: skip


def _deepspeed_module(recipe: Recipe, device: torch.device) -> TrainModule:
    engine = importlib.import_module("framework.deepspeed.engine")
    model = use_kernels(
        materialize_model(recipe.model, device, recipe.train.seed), resolve_kernels(recipe, device)
    )
    return engine.DeepSpeedTrainModule(model, recipe, device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(
    recipe: Recipe,
    device: torch.device,
    make_module: Callable[[Recipe, torch.device], TrainModule],
    *,
    dp_rank: int,
    dp_size: int,
    rank: int,
    resume: str | None,
    layout: dict[str, int] | None,
    accept_data_change: bool = False,
) -> dict[str, Any]:
    # before the model is built: cuBLAS reads its workspace setting once
    with deterministic_run(recipe.train.deterministic):
        torch.manual_seed(recipe.train.seed)  # Trainer.fit re-seeds dropout per rank (train_module.rng_seed)
        tokenizer = Tokenizer(recipe.data.tokenizer)
        train_source, val_source = build_data(recipe.data, recipe.model, tokenizer, device.type)
        module = make_module(recipe, device)
        callbacks = default_callbacks(
            recipe,
            val_batches=None if val_source is None else ValidationBatches(val_source, recipe),
            # Held-out batches are split over the data-parallel ranks (tp/pp peers evaluate the same ones).
            dp_rank=dp_rank,
            dp_size=dp_size,
            flops_per_token=flops_per_token(recipe.model, recipe.data.seq_len, training=True),
            resume=resume,
            rank=rank,
            layout=layout,
            accept_data_change=accept_data_change,
        )
        batches = StepBatches(train_source, recipe, dp_rank, dp_size)
        return Trainer(module, batches, callbacks, recipe, dp_size=dp_size).fit() or {}


def _single_module(recipe: Recipe, device: torch.device) -> TrainModule:
    model = apply_fp8(materialize_model(recipe.model, device, recipe.train.seed), recipe.precision, device)
    model = use_kernels(model, resolve_kernels(recipe, device))
    apply_compile(model, recipe.parallel.compile, device.type)  # as parallelize does, after fp8 and kernels
    return TrainModule(model, recipe, device)


def _distributed_module(
    recipe: Recipe, device: torch.device, *, dims: ParallelDims, mesh: DeviceMesh
) -> TrainModule:
    model = use_kernels(build_parallel_model(recipe, dims, mesh, device), resolve_kernels(recipe, device))
    return train_module_for(model, recipe, device, dims, mesh)  # the pipeline engine when pp > 1


def describe_rank(mesh: DeviceMesh) -> str:
    """This rank's coordinates on each mesh dimension larger than 1, e.g. 'rank 3: dp_shard 1 tp 1'."""
    names = mesh.mesh_dim_names or ()
    coords = [
        f"{n} {c}" for n, c, s in zip(names, mesh.get_coordinate() or (), mesh.shape, strict=True) if s > 1
    ]
    return f"rank {dist.get_rank()}: {' '.join(coords)}"


def log_node_map() -> None:
    """Rank 0 logs which node each rank runs on, e.g. 'node map: node1 [0, 1]; node2 [2, 3]' (Slurm's node name
    where set: several Slurm nodes may share one host name). A collective: every rank calls it."""
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    ranks: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        ranks.setdefault(str(name), []).append(rank)
    if dist.get_rank() == 0:
        log.info("node map: %s", "; ".join(f"{name} {r}" for name, r in ranks.items()))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """The default process group for this worker (launched by torchrun: RANK/WORLD_SIZE/MASTER_* set):
    NCCL on CUDA (one GPU per local rank), gloo on CPU. Yields the device this rank trains on."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


class StepBatches:
    """Per-step micro-batches of a data source; its state (consumed samples, seed) is checkpointed by the trainer.
    The stream starts when iterated, i.e. after a resume has restored the state."""

    def __init__(self, source: TrainSource, recipe: Recipe, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.source = source
        self.global_batch_size = recipe.train.global_batch_size
        self.micro_batch_size = recipe.train.micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.ramp, self.seq_len = recipe.train.batch_ramp, recipe.data.seq_len

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """This data-parallel rank's slice of each global batch (of train.batch_ramp's size, when set)."""
        ramp = self.ramp
        size_at = None if ramp is None else partial(ramp.size_at, self.global_batch_size, self.seq_len)
        return self.source.batches(
            self.global_batch_size, self.micro_batch_size, self.dp_rank, self.dp_size, size_at
        )

    @property
    def consumed_samples(self) -> int:
        """The global sample position the next step starts from."""
        return self.source.consumed_samples

    def skip(self, start: int, end: int) -> None:
        """Step over global samples [start, end) (a loss-spike rewind)."""
        self.source.skip(start, end)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


class ValidationBatches:
    """Re-iterable held-out micro-batches: every evaluation sees the same train.eval_batches batches."""

    def __init__(self, source: ValidationSource, recipe: Recipe) -> None:
        self.source = source
        self.micro_batch_size = recipe.train.micro_batch_size
        self.num_batches = recipe.train.eval_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.source.batches(self.micro_batch_size, self.num_batches)
