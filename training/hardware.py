"""What the hardware can do and what a run uses of it: peak FLOP/s for MFU, memory metrics.

MFU = achieved model FLOP/s (model/flops.py: 6N + attention per token, DeepSeek-V3's accounting) /
the device's dense peak in the run's precision. `PEAK_TFLOPS` holds NVIDIA's published dense
(no 2:4 sparsity) tensor-core figures per GPU; `precision=fp8` is measured against the FP8 peak,
`bf16` against BF16, `fp32` against the plain FP32 (non-tensor-core) figure, since fp32 GEMMs do not
use TF32 here. `train.peak_tflops` overrides the table; an unknown GPU without it gets no MFU.
On the CPU the figure is a measured matmul rate per thread of a 2-core x86 machine.

Memory: on CUDA the peak of tensor memory (`mem_peak_gib`) and of the caching allocator's reserved
memory (`mem_reserved_gib`) since the previous record; on the CPU the process's peak resident set
(`mem_rss_peak_gib`, since start: the kernel keeps no resettable peak). All in GiB, max over ranks.

`train.deterministic=true` (`use_deterministic`) switches CUDA to deterministic algorithms; the
README's "Exactness" section says what each mode guarantees.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Dict, Optional, Tuple

import torch

GIB = float(1 << 30)

# (words that must all appear in torch.cuda.get_device_name(), table name): the first match wins,
# so a more specific name comes before its prefix.
DEVICE_NAMES: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    (("GB200",), "GB200"),
    (("B200",), "B200"),
    (("H200", "NVL"), "H200 NVL"),
    (("H200",), "H200"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100",), "H100 SXM"),
    (("H800", "PCIE"), "H800 PCIe"),
    (("H800",), "H800 SXM"),
)

# Dense TFLOP/s per GPU (NVIDIA data sheets; GB200 per GPU of an NVL72 rack).
PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp8": 1670.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp8": 1670.5, "fp32": 60.0},
    "H800 SXM": {"bf16": 989.4, "fp8": 1978.9, "fp32": 66.9},
    "H800 PCIe": {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.2},
    "B200": {"bf16": 2250.0, "fp8": 4500.0, "fp32": 75.0},
    "GB200": {"bf16": 2500.0, "fp8": 5000.0, "fp32": 80.0},
}

CPU_TFLOPS_PER_THREAD = {"bf16": 0.45, "fp8": 0.45, "fp32": 0.1}


def device_kind(name: str) -> Optional[str]:
    """The `PEAK_TFLOPS` entry of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), or None."""
    upper = name.upper()
    for words, kind in DEVICE_NAMES:
        if all(w in upper for w in words):
            return kind
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, precision: str, override: Optional[float] = None,
                threads: Optional[int] = None) -> Optional[float]:
    """Dense peak TFLOP/s of one `device` in `precision` (`train.peak_tflops` when given); None for a
    GPU that is not in the table."""
    if override is not None:
        return float(override)
    if device.type == "cuda":
        kind = device_kind(device_name(device))
        return PEAK_TFLOPS[kind][precision] if kind is not None else None
    return CPU_TFLOPS_PER_THREAD[precision] * (threads or torch.get_num_threads())


def peak_rss_gib() -> float:
    """Peak resident set size of this process since it started, in GiB: VmHWM of /proc/self/status on
    Linux (exact; getrusage's ru_maxrss reads per-CPU counters that lag), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / GIB
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB


def memory_metrics(device: torch.device) -> Dict[str, float]:
    """This process's memory figures (module docstring); on CUDA the peaks are reset for the next call."""
    if device.type == "cuda":
        out = {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
               "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"mem_rss_peak_gib": peak_rss_gib()}


def use_deterministic(enabled: bool) -> None:
    """`train.deterministic`: deterministic algorithms everywhere (index_add_ and scatter_add_ without
    atomics, deterministic attention backward, a fixed cuBLAS workspace; an op without a deterministic
    implementation raises). Call before CUDA is initialized (CUBLAS_WORKSPACE_CONFIG is read then)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
