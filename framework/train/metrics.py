"""Throughput numbers: tokens/s, achieved TFLOP/s and MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s / peak FLOP/s of the device. Achieved = flops_per_token (training FLOPs of one token,
forward + backward, e.g. about 6 x parameters + attention; computed by framework/models/flops.py and passed in as a
number) x tokens/s of this device. The peak is the device's dense bf16 tensor-core rate (no 2:4 sparsity), the
usual reference for mixed-precision training, looked up in framework/gpus.py; `logging.peak_tflops` overrides it
(e.g. for fp32 or a device not listed there). CPUs have no entry: MFU is then null unless overridden.

Every rate is per device (per-GPU MFU): the model FLOPs of a step divided by the world size. A rank counts the
tokens of the sequences it computes (its cp shard under context parallelism), but its tp and pp peers count the
same tokens while each computes only part of the model, so a rank's share of the tokens is its count divided by
tp x pp (`devices_per_token`). Summed over the world that gives every global token exactly once.
"""

from __future__ import annotations

import re

import torch

from framework.gpus import GPUS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def lookup_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a device by its name (framework/gpus.py: a table entry's model number, matched whole:
    "H20" does not match "H200", nor "B200" "GB200"); None when unknown (e.g. CPUs)."""
    for gpu in GPUS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(gpu.device)}(?![0-9])", name, flags=re.IGNORECASE):
            return gpu.peak_bf16_tflops
    return None


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """logging.peak_tflops when set, else the table entry for this device."""
    return override if override is not None else lookup_peak_tflops(device_name(device))


def throughput(
    tokens: float, seconds: float, flops_per_token: float | None, peak: float | None
) -> dict[str, float | None]:
    """tokens/s, TFLOP/s and MFU of one device over an interval (None where an input is missing)."""
    tokens_per_s = tokens / seconds if seconds > 0 else None
    tflops = None
    if tokens_per_s is not None and flops_per_token is not None:
        tflops = flops_per_token * tokens_per_s / 1e12
    mfu = tflops / peak if tflops is not None and peak else None
    return {"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": mfu}
