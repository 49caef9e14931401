"""framework/run.py: what a run says in its first lines."""

from __future__ import annotations

import pytest
import torch

import framework.run as run
from framework.config.schema import Recipe

CUDA = torch.device("cuda", 0)


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The preflight of a run on a CUDA device, faked on CPU: the memory check (which reads the GPU's
    properties) is skipped, Transformer Engine is importable."""
    monkeypatch.setattr(run, "resolve_device", lambda name: CUDA)
    monkeypatch.setattr(run, "check_fits", lambda *args: None)
    monkeypatch.setattr(run, "te_importable", lambda: True)
    monkeypatch.delenv("RANK", raising=False)
    return monkeypatch


def test_auto_choosing_te_on_cuda_is_said_in_the_first_line(on_cuda, capsys) -> None:
    run._preflight(Recipe())  # model.kernels: auto
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("kernels: te ") and "model.kernels: auto" in first


def test_auto_falling_back_to_torch_on_cuda_is_said_too(on_cuda, capsys) -> None:
    on_cuda.setattr(run, "te_importable", lambda: False)
    run._preflight(Recipe())
    assert capsys.readouterr().out.splitlines()[0].startswith("kernels: torch ")


def test_only_rank_0_says_it(on_cuda, capsys) -> None:
    on_cuda.setenv("RANK", "1")
    assert run.announce_kernels(Recipe(), CUDA) == "te"
    assert capsys.readouterr().out == ""
