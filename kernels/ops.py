"""FP8 operations that pick their implementation per call: Triton for CUDA tensors, else the reference.

`kernels.fp8` defines the numerics; `kernels.triton` must reproduce them. `use_backend("triton")`
forces the Triton kernels (tests run them on CPU under TRITON_INTERPRET=1), `use_backend("reference")`
forces PyTorch; the default "auto" takes Triton when the tensor is on CUDA and Triton imports.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from . import fp8 as reference
from .fp8 import dequantize, dequantize_e5m6, quantize_e5m6

BACKENDS = ("auto", "reference", "triton")
_backend = "auto"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton kernels import (a GPU build of Triton, or the interpreter)."""
    try:
        from . import triton as _  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, run every operation with `name` ("auto", "reference" or "triton")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _impl(t: torch.Tensor):
    if _backend == "triton" or (_backend == "auto" and t.is_cuda and triton_available()):
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


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """See `kernels.fp8.fp8_gemm`."""
    return _impl(a).fp8_gemm(a, a_scale, b, b_scale, out_dtype)


def fp8_gemm_grouped_m(a, a_scale, b, b_scale, counts, out_dtype=torch.bfloat16):
    """See `kernels.fp8.fp8_gemm_grouped_m`."""
    return _impl(a).fp8_gemm_grouped_m(a, a_scale, b, b_scale, counts, out_dtype)


def fp8_gemm_grouped_k(a, a_scale, b, b_scale, counts):
    """See `kernels.fp8.fp8_gemm_grouped_k`."""
    return _impl(a).fp8_gemm_grouped_k(a, a_scale, b, b_scale, counts)


__all__ = ["use_backend", "triton_available", "quantize_1x128", "quantize_128x128", "quantize_128x1",
           "fp8_gemm", "fp8_gemm_grouped_m", "fp8_gemm_grouped_k", "dequantize", "quantize_e5m6",
           "dequantize_e5m6"]
