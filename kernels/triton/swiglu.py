"""Fused SwiGLU and 1x128 FP8 quantization of the experts' hidden activation (DeepSeek-V3 section 3.3).

One kernel reads the gate/up GEMM's output gu [T, 2I] (bf16 or fp32), computes silu(gate) * up times
the row's routing weight in fp32 and writes the FP8 values and 1x128 scales the down projection
consumes: the SwiGLU output never goes to memory in high precision. With `with_input` the same pass
also writes gu's own 1x128 quantization (the FP8 copy backward keeps), so gu is read once. Bit for bit the numerics of
`kernels.swiglu.swiglu_quantize_1x128` (its exp in separately rounded fp32 operations, hence
`enable_fp_fusion=False`; division with `div_rn`) and of `kernels.fp8`'s quantization rules (the
quantizers' `_amax`, `_scale`, `_e4m3_bits`). A program quantizes BLOCK_M rows x one 128-column tile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..fp8 import BLOCK, E4M3, cdiv
from ..swiglu import EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND_MAGIC
from .launch import launch
from .quant import _amax, _e4m3_bits, _scale, quantize_1x128

_LO, _HI, _LOG2E, _MAGIC = tl.constexpr(EXP_LO), tl.constexpr(EXP_HI), tl.constexpr(LOG2E), tl.constexpr(ROUND_MAGIC)
_LN2_HI, _LN2_LO = tl.constexpr(LN2_HI), tl.constexpr(LN2_LO)
_P0, _P1, _P2, _P3, _P4, _P5 = (tl.constexpr(c) for c in EXP_POLY)


@triton.jit
def _exp_f32(x):
    """`kernels.swiglu.exp_f32`, operation for operation."""
    x = tl.minimum(tl.maximum(x, _LO, propagate_nan=tl.PropagateNan.ALL), _HI, propagate_nan=tl.PropagateNan.ALL)
    n = (x * _LOG2E + _MAGIC) - _MAGIC
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = r * _P0 + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    y = (p * (r * r) + r) + 1.0
    n_int = tl.where(n != n, 0.0, n).to(tl.int32)
    return y * ((n_int + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _swiglu_quant_kernel(gu_ptr, w_ptr, q_ptr, s_ptr, guq_ptr, gus_ptr, M, I, IB, stride_gm, HAS_WEIGHT: tl.constexpr,
                         QUANT_GU: tl.constexpr, POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < I)
    rows64 = rows.to(tl.int64)
    g_ptrs = gu_ptr + rows64[:, None] * stride_gm + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    if QUANT_GU:  # gu's own 1x128 tiles (I a multiple of 128: gate tile kb, up tile IB + kb)
        guq = guq_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        sg, su = _scale(_amax(g, 1), POW2), _scale(_amax(u, 1), POW2)
        tl.store(guq, _e4m3_bits(g, sg[:, None]), mask=mask)
        tl.store(guq + I, _e4m3_bits(u, su[:, None]), mask=mask)
        tl.store(gus_ptr + rows64 * (2 * IB) + kb, sg, mask=rmask)
        tl.store(gus_ptr + rows64 * (2 * IB) + IB + kb, su, mask=rmask)
    h = tl.math.div_rn(g, _exp_f32(-g) + 1.0) * u
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)[:, None]
    s = _scale(_amax(h, 1), POW2)
    tl.store(q_ptr + rows64[:, None] * I + cols[None, :], _e4m3_bits(h, s[:, None]), mask=mask)
    tl.store(s_ptr + rows64 * IB + kb, s, mask=rmask)


def swiglu_quantize_1x128(gu: torch.Tensor, row_weight: Optional[torch.Tensor] = None, pow2: bool = False,
                          with_input: bool = False) -> Tuple[torch.Tensor, ...]:
    """Triton version of `kernels.swiglu.swiglu_quantize_1x128` (gu [T, 2I] -> FP8 [T, I], scales [T, ceil(I/128)],
    and with `with_input` gu's own 1x128 quantization, in the same pass when I is a multiple of 128)."""
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    M, I = gu.shape[0], gu.shape[1] // 2
    IB = cdiv(I, BLOCK)
    fused_input = with_input and I % BLOCK == 0
    q = torch.empty(M, I, dtype=torch.uint8, device=gu.device)
    s = torch.empty(M, IB, dtype=torch.float32, device=gu.device)
    guq = torch.empty(M, 2 * I, dtype=torch.uint8, device=gu.device) if fused_input else q
    gus = torch.empty(M, 2 * IB, dtype=torch.float32, device=gu.device) if fused_input else s
    if M and I:
        w = row_weight.contiguous() if row_weight is not None else s
        launch(_swiglu_quant_kernel, (cdiv(M, 32), IB), gu, w, q, s, guq, gus, M, I, IB, gu.stride(0),
               HAS_WEIGHT=row_weight is not None, QUANT_GU=fused_input, POW2=pow2, BLOCK_M=32,
               enable_fp_fusion=False)
    out = (q.view(E4M3), s)
    if not with_input:
        return out
    return out + ((guq.view(E4M3), gus) if fused_input else quantize_1x128(gu, pow2))
