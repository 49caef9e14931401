"""The GPU table (framework/gpus.py): what launch.gpu accepts, the memory it plans with, the peak MFU divides by."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from framework.config import ConfigError
from framework.config.loader import load_recipe
from framework.gpus import GPU_NAMES, GPUS, gpu_named
from framework.train.metrics import lookup_peak_tflops

DEBUG = Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"


def test_names_are_unique_and_say_model_and_memory() -> None:
    assert len(set(GPU_NAMES)) == len(GPU_NAMES)
    for gpu in GPUS:
        assert re.fullmatch(r"[A-Z0-9][A-Za-z0-9]*(-[A-Za-z]+)?-\d+GB", gpu.name), gpu.name
        assert gpu_named(gpu.name) is gpu


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.name)
def test_memory_is_below_the_datasheet_and_near_it(gpu) -> None:
    """PyTorch can allocate less than the datasheet's capacity (read as GiB, the HBM stacks' size), but not less
    than 95% of it read as 10**9 bytes (GDDR parts with ECC on lose about 6%)."""
    datasheet = int(re.search(r"(\d+)GB$", gpu.name).group(1))
    assert 0.95 * datasheet * 1e9 / 2**30 <= gpu.memory_gib <= datasheet
    assert gpu.memory_bytes == int(gpu.memory_gib * 2**30)


@pytest.mark.parametrize("gpu", GPUS, ids=lambda g: g.name)
def test_a_device_name_finds_its_own_peak(gpu) -> None:
    """The table's order lets each entry's device name reach it (or a memory variant with the same peak): "H100"
    must not shadow "H100 PCIe", nor "L40" "L40S"."""
    assert lookup_peak_tflops(f"NVIDIA {gpu.device} Tensor Core GPU") == gpu.peak_bf16_tflops


def test_an_unknown_name_is_one_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(DEBUG, ["launch.gpu=H100"])
    err = info.value
    assert err.key == "launch.gpu" and err.value == "H100" and "\n" not in str(err)
    assert all(name in err.fix for name in GPU_NAMES)


def test_a_known_name_loads_and_null_is_the_default() -> None:
    assert load_recipe(DEBUG, ["launch.gpu=A100-40GB"]).launch.gpu == "A100-40GB"
    assert load_recipe(DEBUG).launch.gpu is None
