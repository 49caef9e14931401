"""parallel.compile: every block of the model `parallelize` gets (on the meta device) is compiled for the run's
device, whatever device the model itself is on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import flex_attention as flex_module

from framework.config.schema import ModelConfig
from framework.models import attention as attention_module
from framework.models import build_model, init_weights
from framework.parallel.parallelize import apply_compile, blocks


def meta_model() -> nn.Module:
    cfg = ModelConfig(
        vocab_size=37, d_model=16, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=32, max_seq_len=16
    )
    with torch.device("meta"):
        return build_model(cfg)


def compiled(module: nn.Module) -> bool:
    """nn.Module.compile stores the compiled call here (and leaves parameter names alone)."""
    return module._compiled_call_impl is not None


def test_blocks_of_a_meta_model_compile_for_the_target_device() -> None:
    for device_type in ("cuda", "cpu"):
        model = meta_model()
        names = [name for name, _ in model.named_parameters()]
        apply_compile(model, True, device_type)
        assert [name for name, _ in blocks(model)] == ["layers.0", "layers.1"]
        assert all(compiled(block) for _, block in blocks(model))
        assert not compiled(model)  # blocks only: FSDP2's root and per-block hooks stay outside
        assert [name for name, _ in model.named_parameters()] == names


def test_compile_off_compiles_nothing() -> None:
    model = meta_model()
    apply_compile(model, False, "cuda")
    assert not any(compiled(m) for m in model.modules())


def test_compiled_blocks_trace_cuda_flex_attention_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors routed as CUDA ones (masked attention -> FlexAttention): Dynamo takes each block whole (no graph
    break, block mask built inside layer 0's graph), reuses the graphs on the next forward, traces flex_attention
    into the block rather than calling the separately compiled one, and matches the eager model."""
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    def no_nested_compile() -> None:
        raise AssertionError("compiled_flex_attention called inside a compiled block")

    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=3, n_heads=4, kv_heads=2, ffn_hidden=32,
                      max_seq_len=32, sliding_window=5)  # fmt: skip
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    monkeypatch.setattr(attention_module, "device_type", lambda t: "cuda")
    monkeypatch.setattr(attention_module, "compiled_flex_attention", lambda: attention_module.flex_attention)
    torch.manual_seed(0)
    model = build_model(cfg)
    init_weights(model, cfg, 0)
    ids = torch.randint(0, 37, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # FlexAttention has no CPU backward
        expected = model.eval()(ids)
    module_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self: module_compile(self, backend=recording_backend))
    monkeypatch.setattr(attention_module, "compiled_flex_attention", no_nested_compile)
    torch._dynamo.reset()
    counters.clear()
    try:
        apply_compile(model, True, "cpu")
        with torch.no_grad():
            outs = [model(ids) for _ in range(3)]
        breaks, frames = dict(counters["graph_break"]), dict(counters["frames"])
    finally:
        torch._dynamo.reset()
    assert breaks == {} and frames["ok"] == frames["total"]
    assert 1 <= len(graphs) <= 2  # layer 0 (builds the block mask) and the layers reusing it; no recompiles
    for out in outs:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
