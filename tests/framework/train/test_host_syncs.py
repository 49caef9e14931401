"""Host syncs inside one training step: a bound that does not grow with the number of layers.

On a GPU each read of a device value on the host (item, tolist, bool/int/float of a tensor, .cpu, .numpy) and each
op whose output size depends on device data (boolean masking, nonzero, bincount, repeat_interleave by a tensor)
drains the queue and idles the GPU. On CPU the same calls can be counted: `count_syncs` patches the Tensor methods
with counting wrappers and watches the dispatched ops. The optimizer's `step` counters are excluded: torch keeps them
on the host for non-capturable optimizers, so reading them never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config.schema import ModelConfig, MoEConfig
from framework.models import build_model, init_weights
from framework.models.moe import moe_layers
from framework.train.train_module import TrainModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import make_batches, make_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
aten = torch.ops.aten
# Ops whose output shape is decided by device values: on CUDA each waits for the device (torch sync debug mode).
SHAPE_FROM_DATA = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.unique_dim.default,
}


def _site() -> str:
    """The innermost frame of Loom's own code that led to the sync (file:line), else the innermost frame."""
    frame = sys._getframe(2)
    first = None
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        first = first or f"{path.name}:{frame.f_lineno}"
        if ROOT in path.parents and "tests" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return first or "?"


class _ShapeFromData(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        by_tensor = func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if func in SHAPE_FROM_DATA or bool_index or by_tensor:
            self.counts[f"{func}@{_site()}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(host_tensors: set[int] = frozenset()) -> Iterator[Counter]:  # type: ignore[assignment]
    """Counter of syncs by 'what@file:line' while active; tensors whose id() is in host_tensors are not counted."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str) -> Any:
        original = originals[name]

        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if id(self) not in host_tensors:
                counts[f"{name}@{_site()}"] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _ShapeFromData(counts):
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _model(n_layers: int, moe: MoEConfig | None) -> ModelConfig:
    return ModelConfig(
        vocab_size=32, d_model=16, n_layers=n_layers, n_heads=2, ffn_hidden=16, max_seq_len=8, moe=moe
    )


def _module(tmp_path: Path, n_layers: int, moe: MoEConfig | None, kernel: str = "grouped") -> TrainModule:
    recipe = make_recipe(tmp_path, {"train.global_batch_size": 4, "train.micro_batch_size": 2})
    recipe.model = _model(n_layers, moe)
    model = build_model(recipe.model)
    init_weights(model, recipe.model, seed=0)
    for layer in moe_layers(model).values():
        layer.experts.kernel = kernel  # the CPU default is the loop; "grouped" is the CUDA path
    return TrainModule(model, recipe, "cpu")


def _step_syncs(module: TrainModule) -> Counter:
    """Syncs of the second optimizer step (the first creates the optimizer's state), 2 micro-batches."""
    batches = make_batches(4, batch=2)
    module.train_batch(batches[:2])
    module.optim_step()
    steps = {id(s["step"]) for s in module.optimizer.state.values() if torch.is_tensor(s.get("step"))}
    with count_syncs(steps) as counts:
        module.train_batch(batches[2:])
        module.optim_step()
    return counts


MOE = {
    "dropless": MoEConfig(n_experts=4, top_k=2, expert_hidden=8, z_loss=0.001),
    "capacity": MoEConfig(n_experts=4, top_k=2, expert_hidden=8, capacity_factor=1.0, bias_update_rate=0.01),
    "global_batch": MoEConfig(n_experts=4, top_k=2, expert_hidden=8, aux_loss_scope="global_batch"),
    "sequence": MoEConfig(n_experts=4, top_k=2, expert_hidden=8, aux_loss_scope="sequence"),
}


def test_the_counter_sees_reads_and_masking() -> None:
    x = torch.arange(4.0)
    with count_syncs() as counts:
        x.sum().item()
        x[x > 1].sum()
        bool(x.any())
        torch.bincount(x.long())
    assert sum(counts.values()) == 4, counts


@pytest.mark.parametrize("moe", [None, *MOE], ids=["dense", *MOE])
def test_syncs_per_step_do_not_grow_with_depth(tmp_path: Path, moe: str | None) -> None:
    """Dense: the train module's one read of the step's stats. MoE (grouped experts): that read and the MoE
    metrics' one read, for 2 or 4 layers alike."""
    cfg = MOE[moe] if moe else None
    two, four = (_step_syncs(_module(tmp_path / str(n), n, cfg)) for n in (2, 4))
    assert two == four, (two, four)
    assert sum(two.values()) == (1 if moe is None else 2), two


def test_the_expert_loop_reads_the_counts_once_per_layer_forward(tmp_path: Path) -> None:
    """The CPU path slices on the host: one read per MoE layer and micro-batch, nothing else per layer."""
    counts = _step_syncs(_module(tmp_path, 2, MOE["capacity"], kernel="loop"))
    loop = {site: n for site, n in counts.items() if site.startswith("tolist@framework/models/moe.py")}
    assert list(loop.values()) == [2 * 2], counts
    assert sum(counts.values()) - 4 == 2, counts


def test_the_balancer_reduces_once_per_step_whatever_the_depth(tmp_path: Path) -> None:
    """Collectives of the balancer in one step (start_step, the micro-batches' losses, metrics, the bias update),
    counted through its `reduce`: a fixed number, not one per layer (global_batch adds one per layer and
    micro-batch: its loss uses the counts so far)."""
    calls = []
    for n in (2, 4):
        module = _module(tmp_path / str(n), n, MOE["capacity"])
        balancer = module.moe
        assert balancer is not None
        reduce = balancer.reduce
        calls.append(0)

        def counted(t: torch.Tensor, reduce: Any = reduce) -> torch.Tensor:
            calls[-1] += 1
            return reduce(t)

        balancer.reduce = counted
        _step_syncs(module)
        calls[-1] = calls[-1] // 2  # two steps ran
    assert calls == [3, 3], calls  # start_step's totals, the floats and the longs of the step's statistics
