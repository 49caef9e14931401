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
    # TF32 is process-wide: recorded here, never set in the test process
    monkeypatch.setattr(torch, "set_float32_matmul_precision", _MATMUL_PRECISION.append)
    _MATMUL_PRECISION.clear()
    return monkeypatch


_MATMUL_PRECISION: list[str] = []


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


def test_precision_auto_is_bf16_with_tf32_on_cuda_and_said(on_cuda, capsys) -> None:
    """A recipe that names no dtype (debug, BERT, T5) runs bf16 autocast on a GPU, not fp32 far below the peak
    MFU is measured against; what autocast keeps in fp32 uses TF32. Both are said in the run's first lines."""
    recipe = Recipe()
    assert recipe.precision.dtype == "auto"
    run._preflight(recipe)
    assert recipe.precision.dtype == "bf16" and _MATMUL_PRECISION == ["high"]
    lines = capsys.readouterr().out.splitlines()
    assert "precision: bf16 autocast, fp32 matmuls in TF32 (precision.dtype: auto)" in lines


def test_explicit_fp32_on_cuda_keeps_fp32_and_tf32_can_be_refused(on_cuda, capsys) -> None:
    recipe = Recipe()
    recipe.precision.dtype, recipe.precision.tf32 = "fp32", False
    run._preflight(recipe)
    assert recipe.precision.dtype == "fp32" and _MATMUL_PRECISION == []
    assert "precision: fp32, fp32 matmuls in full fp32 (precision.dtype: fp32)" in capsys.readouterr().out


def test_precision_auto_is_fp32_on_cpu_and_silent(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch, "set_float32_matmul_precision", _MATMUL_PRECISION.append)
    _MATMUL_PRECISION.clear()
    recipe = Recipe()
    assert run.announce_precision(recipe, torch.device("cpu")) == ""
    assert recipe.precision.dtype == "fp32" and _MATMUL_PRECISION == []
    assert capsys.readouterr().out == ""


def test_the_engines_read_auto_as_the_devices_dtype() -> None:
    """Code that meets an unresolved recipe (a test, a tool) takes the same choice as a run: the autocast dtype
    and FSDP2's parameter dtype."""
    from framework.config.schema import PrecisionConfig
    from framework.train.precision import Precision

    assert Precision(PrecisionConfig(), CUDA).autocast_dtype is torch.bfloat16
    assert Precision(PrecisionConfig(), torch.device("cpu")).autocast_dtype is None
    assert PrecisionConfig().resolved_dtype("cuda") == "bf16"
    assert PrecisionConfig(dtype="fp16").resolved_dtype("cuda") == "fp16"
