"""The GPU models Loom knows: the memory one process can use and the dense bf16 peak, in one table.

A recipe names the GPU it is laid out for in `launch.gpu` (a `GPU.name` below); `loom check` then compares the
per-rank memory estimate (framework/models/memory.py) with that GPU's memory. The MFU metric
(framework/train/metrics.py) looks a running device's peak up here by its device name.

memory_gib is what PyTorch can allocate on the device: `torch.cuda.get_device_properties(i).total_memory`, the
"total capacity" an out-of-memory message quotes. It is less than the datasheet's number, because the driver, the
firmware and (on GDDR parts) ECC take their share: an "80GB" H100 or A100 carries 80 GiB of HBM, of which PyTorch
reports 79.11 to 79.33 GiB; a "141GB" H200 139.72 to 139.81 GiB; a "48GB" L40S 44.34 to 44.67 GiB (48 GB of
GDDR6 with ECC on); a "24GB" L4 or A10G 22.03 to 22.06 GiB. Each entry is the lowest figure found in published
out-of-memory reports for that part, rounded down to 0.1 GiB; a part with no report takes the figure of a part
with the same memory (noted on its row). A bound on what a process can hold, not a promise: the CUDA context,
NCCL's buffers and the allocator's fragmentation take a further 1-5 GiB, which is why Loom's recipes are laid out
to need at most 90% of it (tests/recipes/test_fit.py).

peak_bf16_tflops is the dense bf16 tensor-core rate from the vendor's datasheet (no 2:4 sparsity), per device as
PyTorch sees it (an MI250X is two devices, one per die).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One GPU model."""

    name: str
    """What launch.gpu names: the model and its datasheet memory, e.g. "H100-80GB"."""
    device: str
    """A whole model number inside the name torch reports ("NVIDIA H100 80GB HBM3" contains "H100")."""
    memory_gib: float
    """GiB PyTorch can allocate on one device (total_memory; see the module docstring)."""
    peak_bf16_tflops: float
    """Dense bf16 tensor-core TFLOP/s of one device (datasheet)."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


# Device names are matched in this order and the first hit wins, so more specific names come first ("H100 PCIe"
# before "H100", "L40S" before "L40"); variants that differ only in memory share their device name and peak.
GPUS: tuple[GPU, ...] = (
    GPU("GB200-186GB", "GB200", 184.3, 2500.0),
    GPU("B200-180GB", "B200", 178.3, 2250.0),
    GPU("B100-180GB", "B100", 178.3, 1750.0),  # no report: B200's memory
    GPU("H200-NVL-141GB", "H200 NVL", 139.7, 835.0),  # the PCIe card: 835 TFLOP/s dense bf16, not SXM's 989
    GPU("H200-141GB", "H200", 139.7, 989.0),
    GPU("GH200-96GB", "GH200", 94.5, 989.0),  # no report: H20's 96 GB of HBM3, less 0.5
    GPU("H100-PCIe-80GB", "H100 PCIe", 79.1, 756.0),
    GPU("H100-NVL-94GB", "H100 NVL", 93.0, 835.0),
    GPU("H100-80GB", "H100", 79.1, 989.0),  # SXM
    GPU("H800-80GB", "H800", 79.1, 989.0),  # no report: H100's memory
    GPU("H20-96GB", "H20", 95.0, 148.0),
    GPU("A100-80GB", "A100", 79.1, 312.0),
    GPU("A100-40GB", "A100", 39.2, 312.0),
    GPU("A800-80GB", "A800", 79.1, 312.0),  # no report: A100's memory
    GPU("L40S-48GB", "L40S", 44.3, 362.0),
    GPU("L40-48GB", "L40", 44.3, 181.0),  # no report: L40S's memory
    GPU("L4-24GB", "L4", 22.0, 121.0),
    GPU("A6000-48GB", "A6000", 44.3, 155.0),  # with ECC on, as L40S
    GPU("A40-48GB", "A40", 44.3, 150.0),  # no report: L40S's memory
    GPU("A30-24GB", "A30", 22.0, 165.0),  # no report: A10's memory
    GPU("A10G-24GB", "A10G", 22.0, 70.0),
    GPU("A10-24GB", "A10", 22.0, 125.0),  # no report: A10G's memory
    GPU("RTX4090-24GB", "RTX 4090", 23.6, 165.0),
    GPU("RTX3090-24GB", "RTX 3090", 23.6, 71.0),
    GPU("MI355X-288GB", "MI355X", 287.6, 2500.0),  # no report: MI300X's 0.4 GiB reserve
    GPU("MI325X-256GB", "MI325X", 255.6, 1307.0),
    GPU("MI300X-192GB", "MI300X", 191.6, 1307.0),
    GPU("MI250X-64GB", "MI250X", 63.9, 191.5),  # one of the package's two dies (128 GB, 383 TFLOP/s in all)
)

GPU_NAMES: tuple[str, ...] = tuple(g.name for g in GPUS)
"""Every name launch.gpu accepts."""


def gpu_named(name: str) -> GPU:
    """The table entry called `name` (a name from GPU_NAMES; KeyError otherwise)."""
    for gpu in GPUS:
        if gpu.name == name:
            return gpu
    raise KeyError(name)
