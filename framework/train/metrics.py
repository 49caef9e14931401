"""Throughput numbers: tokens/s, achieved TFLOP/s and MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s / peak FLOP/s of the device. Achieved = flops_per_token (training FLOPs of one token,
forward + backward, e.g. about 6 x parameters + attention; computed by framework/models/flops.py and passed in as a
number) x tokens/s of this device. The peak is the device's dense bf16 tensor-core rate (no 2:4 sparsity), the
usual reference for mixed-precision training; `logging.peak_tflops` overrides it (e.g. for fp32 or a device not
listed here). CPUs have no entry: MFU is then null unless overridden.
"""

from __future__ import annotations

import re

import torch

# Dense bf16 peak TFLOP/s from vendor datasheets, matched as a whole model number inside the device name ("H20"
# does not match "H200", "B200" not "GB200"); first hit wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("A40", 150.0),
    ("A30", 165.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI355X", 2500.0),
    ("MI325X", 1307.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def lookup_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a device by (substring of) its name; None when unknown (e.g. CPUs)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![0-9])", name, flags=re.IGNORECASE):
            return peak
    return None


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """logging.peak_tflops when set, else the table entry for this device."""
    return override if override is not None else lookup_peak_tflops(device_name(device))


def throughput(
    tokens: int, seconds: float, flops_per_token: float | None, peak: float | None
) -> dict[str, float | None]:
    """tokens/s, TFLOP/s and MFU of one device over an interval (None where an input is missing)."""
    tokens_per_s = tokens / seconds if seconds > 0 else None
    tflops = None
    if tokens_per_s is not None and flops_per_token is not None:
        tflops = flops_per_token * tokens_per_s / 1e12
    mfu = tflops / peak if tflops is not None and peak else None
    return {"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": mfu}
