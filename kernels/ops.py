"""FP8 operations that pick their implementation per call: Triton for CUDA tensors, else the reference.

`kernels.fp8` defines the numerics; `kernels.triton` must reproduce them. The backend
(`precision.fp8_backend`) is "auto" (Triton for CUDA tensors, the reference elsewhere), "triton"
(always Triton: on CPU only under TRITON_INTERPRET=1, as the tests run it) or "reference"
(PyTorch everywhere). `set_backend(name, device)` checks the choice against the device and fails
with the GPU's name and the cause when FP8 cannot run there (no FP8 tensor cores before sm_89, or
Triton kernels that do not import); nothing falls back silently. `use_backend` sets it for a block.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

from . import fp8 as reference
from . import swiglu as swiglu_reference
from .fp8 import dequantize, dequantize_e5m6, quantize_e5m6

BACKENDS = ("auto", "reference", "triton")
FP8_MIN_CAPABILITY = (8, 9)
_backend = "auto"


@functools.lru_cache(maxsize=1)
def triton_import_error() -> Optional[str]:
    """None when the Triton kernels import, else why not (one line)."""
    try:
        from . import triton as _  # noqa: F401
    except Exception as err:  # reported by set_backend / raised again by _impl
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"precision.fp8_backend must be one of {BACKENDS}, got {name!r}")


def set_backend(name: str, device: torch.device) -> None:
    """Make `name` the backend after checking that FP8 can run with it on `device` (RuntimeError if not)."""
    global _backend
    _check_name(name)
    device = torch.device(device)
    if name != "reference" and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise RuntimeError(f"precision.fp8_backend={name}: {gpu} (sm_{cap[0]}{cap[1]}) has no FP8 tensor cores "
                               f"(sm_89 or newer needed); use precision=bf16 or precision.fp8_backend=reference")
        if triton_import_error():
            raise RuntimeError(f"precision.fp8_backend={name}: the Triton FP8 kernels do not import on {gpu}: "
                               f"{triton_import_error()}")
    if name == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1" or triton_import_error():
            raise RuntimeError(f"precision.fp8_backend=triton on {device.type}: needs a CUDA GPU, or "
                               f"TRITON_INTERPRET=1 and Triton ({triton_import_error() or 'interpreter off'})")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, run every operation with `name` ("auto", "reference" or "triton"), unchecked."""
    global _backend
    _check_name(name)
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_triton(t: torch.Tensor) -> bool:
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


def _impl(t: torch.Tensor):
    """The module for tensor t: Triton when forced or for CUDA tensors under "auto" (import errors raise)."""
    if _use_triton(t):
        from . import triton as kernels
        return kernels
    return reference


def quantize_1x128(x, pow2=False):
    """See `kernels.fp8.quantize_1x128`."""
    return _impl(x).quantize_1x128(x, pow2)


def quantize_128x128(w, pow2=False):
    """See `kernels.fp8.quantize_128x128`."""
    return _impl(w).quantize_128x128(w, pow2)


def quantize_128x1(x, pow2=False, *, x_scale=None, counts=None):
    """See `kernels.fp8.quantize_128x1`."""
    return _impl(x).quantize_128x1(x, pow2, x_scale=x_scale, counts=counts)


def swiglu_quantize_1x128(gu, row_weight=None, pow2=False, with_input=False):
    """See `kernels.swiglu.swiglu_quantize_1x128` (fused into one kernel on Triton)."""
    impl = _impl(gu) if _use_triton(gu) else swiglu_reference
    return impl.swiglu_quantize_1x128(gu, row_weight, pow2, with_input)


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """See `kernels.fp8.fp8_gemm`."""
    return _impl(a).fp8_gemm(a, a_scale, b, b_scale, out_dtype)


def fp8_gemm_grouped_m(a, a_scale, b, b_scale, counts, out_dtype=torch.bfloat16):
    """See `kernels.fp8.fp8_gemm_grouped_m`."""
    return _impl(a).fp8_gemm_grouped_m(a, a_scale, b, b_scale, counts, out_dtype)


def fp8_gemm_grouped_k(a, a_scale, b, b_scale, counts):
    """See `kernels.fp8.fp8_gemm_grouped_k`."""
    return _impl(a).fp8_gemm_grouped_k(a, a_scale, b, b_scale, counts)


__all__ = ["use_backend", "set_backend", "triton_import_error", "quantize_1x128", "quantize_128x128", "quantize_128x1",
           "swiglu_quantize_1x128",
           "fp8_gemm", "fp8_gemm_grouped_m", "fp8_gemm_grouped_k", "dequantize", "quantize_e5m6",
           "dequantize_e5m6"]
