"""GPU catalog for planning: peak dense bf16 throughput, memory and board power.

Peaks are DENSE tensor-core bf16 figures (no 2:4 structured sparsity): NVIDIA datasheets
print the sparse figure next to the dense one, and the sparse one is twice as large. The
reference cluster's "~580 PFLOPS" is the A100 sparse peak (624 TFLOP/s x 928 GPUs); its
dense bf16 peak, the one MFU is measured against, is 312 x 928 = 290 PFLOP/s.

Sources (peak dense bf16 TFLOP/s, memory, max board power):
- A100 SXM4 40/80GB: NVIDIA A100 Tensor Core GPU datasheet: 312 (624 sparse), 40/80 GB, 400 W.
- A100 PCIe 80GB: same datasheet: 312, 80 GB, 300 W.
- H100 SXM5 80GB: NVIDIA H100 datasheet: 989 (1,979 sparse), 80 GB, 700 W.
- H100 PCIe 80GB: same datasheet: 756 (1,513 sparse), 80 GB, 350 W.
- H200 SXM 141GB: NVIDIA H200 datasheet: 989 (1,979 sparse), 141 GB, 700 W.
- B200 (HGX): NVIDIA HGX B200 datasheet: 2,250 (4,500 sparse) per GPU, 180 GB, 1,000 W.
- L40S: NVIDIA L40S datasheet: 362 (733 sparse), 48 GB, 350 W.
- L4: NVIDIA L4 datasheet: 121 (242 sparse), 24 GB, 72 W.
- A10: NVIDIA A10 datasheet: 125 (250 sparse), 24 GB, 150 W.
- A10G (the AWS G5 variant, no NVIDIA datasheet): 70 dense bf16, 24 GB, 300 W, as compared
  in Baseten's "NVIDIA A10 vs A10G for ML model inference".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controlplane.errors import ConfigurationError


@dataclass(frozen=True)
class GpuModel:
    name: str
    peak_bf16_tflops: float  # dense, no sparsity
    memory_gb: float  # as on the datasheet (decimal GB)
    tdp_watts: float
    sparse_bf16_tflops: float

    @property
    def peak_flops(self) -> float:
        return self.peak_bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


CATALOG: dict[str, GpuModel] = {
    g.name: g
    for g in (
        GpuModel("A100-40GB", 312.0, 40, 400, 624.0),
        GpuModel("A100-80GB", 312.0, 80, 400, 624.0),
        GpuModel("A100-PCIE-80GB", 312.0, 80, 300, 624.0),
        GpuModel("H100-80GB", 989.0, 80, 700, 1979.0),
        GpuModel("H100-PCIE", 756.0, 80, 350, 1513.0),
        GpuModel("H200", 989.0, 141, 700, 1979.0),
        GpuModel("B200", 2250.0, 180, 1000, 4500.0),
        GpuModel("L40S", 362.0, 48, 350, 733.0),
        GpuModel("L4", 121.0, 24, 72, 242.0),
        GpuModel("A10", 125.0, 24, 150, 250.0),
        GpuModel("A10G", 70.0, 24, 300, 140.0),
    )
}

# Other spellings, including the `nvidia.com/gpu.product` node label values.
ALIASES: dict[str, str] = {
    "a100": "A100-80GB",
    "a100sxm440gb": "A100-40GB",
    "a100sxm480gb": "A100-80GB",
    "a100pcie80gb": "A100-PCIE-80GB",
    "h100": "H100-80GB",
    "h100sxm": "H100-80GB",
    "h100sxm580gb": "H100-80GB",
    "h100pcie": "H100-PCIE",
    "h100pcie80gb": "H100-PCIE",
    "h200141gb": "H200",
    "h200sxm": "H200",
    "h200sxm141gb": "H200",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().removeprefix("nvidia").removeprefix("tesla"))


def gpu(name: str) -> GpuModel:
    """Look a GPU model up by name; accepts 'A100-80GB', 'a100 80gb', 'NVIDIA-A100-SXM4-80GB'."""
    key = _key(name)
    by_key = {_key(n): g for n, g in CATALOG.items()}
    if key in by_key:
        return by_key[key]
    alias = ALIASES.get(key)
    if alias:
        return CATALOG[alias]
    raise ConfigurationError(f"gpu_model {name!r}: not in the catalog (known: {', '.join(CATALOG)})")
