"""The one-process run path compiles the blocks when parallel.compile is set, and the compiled blocks train like
the eager ones. Dynamo traces each block for real; a graph-recording backend stands in for inductor (whose
C++ build of the same graphs takes minutes on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework import run
from framework.config.schema import ModelConfig, ParallelConfig, Recipe
from framework.parallel.parallelize import blocks

CPU = torch.device("cpu")


def recipe(compile_blocks: bool) -> Recipe:
    cfg = ModelConfig(
        vocab_size=37, d_model=16, n_layers=2, n_heads=4, kv_heads=2, ffn_hidden=32, max_seq_len=16
    )
    return Recipe(model=cfg, parallel=ParallelConfig(compile=compile_blocks))


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_one_process_path_compiles_blocks_that_train_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    module_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self: module_compile(self, backend=recording_backend))
    torch._dynamo.reset()
    try:
        model = run._single_module(recipe(True), CPU).model
        assert all(block._compiled_call_impl is not None for _, block in blocks(model))
        eager = run._single_module(recipe(False), CPU).model
        assert not any(block._compiled_call_impl is not None for _, block in blocks(eager))
        ids = torch.randint(0, 37, (2, 17), generator=torch.Generator().manual_seed(0))
        loss, grads = loss_and_grads(model, ids)
        expected_loss, expected_grads = loss_and_grads(eager, ids)
    finally:
        torch._dynamo.reset()
    assert graphs, "no block was traced"
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
