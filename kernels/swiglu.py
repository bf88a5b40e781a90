"""The experts' SwiGLU activation and its FP8 output: the plain-PyTorch reference of the fused Triton kernel.

DeepSeek-V3 section 3.3 (FP8 training): the SwiGLU output silu(gate) * up (times the token's routing
weight) is the input of the down projection's FP8 GEMM, quantized per 1x128 tile (`kernels.fp8`).
`swiglu_quantize_1x128` defines that step; `kernels.triton.swiglu` computes it in one kernel, from
the gate/up GEMM's output to the FP8 values and scales, and must agree bit for bit. For that, silu's
exponential is not a library call (PyTorch, NumPy and CUDA round exp differently) but Cephes' expf:
range reduction by n = round(x log2 e) in two steps of ln 2, a degree-6 polynomial and a scaling by
2^n, each operation a separately rounded fp32 addition or multiplication (no fused multiply-add; the
Triton kernel is compiled with floating-point fusion off), accurate to about 1 ulp. The argument is
clamped to [-87, 88] (exp stays a normal fp32 number); NaN propagates.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .fp8 import quantize_1x128


def _f32(v: float) -> float:
    """v rounded to the nearest fp32 value (so that PyTorch and Triton use the same constant)."""
    return torch.tensor(v, dtype=torch.float32).item()


EXP_LO, EXP_HI = -87.0, 88.0
LOG2E = _f32(1.44269504088896341)
LN2_HI, LN2_LO = 0.693359375, _f32(-2.12194440e-4)
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (t + M) - M rounds t to an integer, ties to even, for |t| < 2^22
EXP_POLY = tuple(_f32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                   1.6666665459e-1, 5.0000001201e-1))


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp of fp32 x clamped to [-87, 88], by Cephes' expf in separately rounded fp32 operations."""
    x = x.float().clamp(EXP_LO, EXP_HI)
    n = (x * LOG2E + ROUND_MAGIC) - ROUND_MAGIC
    r = (x - n * LN2_HI) - n * LN2_LO
    p = torch.full_like(r, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + c
    y = (p * (r * r) + r) + 1.0
    two_n = ((n.nan_to_num(0.0).to(torch.int32) + 127) << 23).view(torch.float32)
    return y * two_n


def silu(g: torch.Tensor) -> torch.Tensor:
    """g / (1 + exp(-g)) in fp32 with `exp_f32` (NaN stays NaN)."""
    g = g.float()
    return g / (exp_f32(-g) + 1.0)


def swiglu(g: torch.Tensor, u: torch.Tensor, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(g) * u in fp32, times row_weight[:, None] (one weight per row) when given."""
    h = silu(g) * u.float()
    return h if row_weight is None else h * row_weight.float().unsqueeze(-1)


def swiglu_quantize_1x128(gu: torch.Tensor, row_weight: Optional[torch.Tensor] = None, pow2: bool = False,
                          with_input: bool = False) -> Tuple[torch.Tensor, ...]:
    """FP8 1x128 (values, scales) of swiglu(gate, up, row_weight) for gu [T, 2I] = [gate | up], followed
    with `with_input` by gu's own 1x128 (values, scales)."""
    g, u = gu.float().chunk(2, dim=-1)
    out = quantize_1x128(swiglu(g, u, row_weight), pow2)
    return out + quantize_1x128(gu, pow2) if with_input else out
