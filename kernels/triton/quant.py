"""Triton FP8 quantization kernels: 1x128, 128x128 and transposed 128x1 (DeepSeek-V3 section 3.3).

Same numerics as `kernels.fp8`, bit for bit: scale = max(div_rn(amax, 448), 2^-126) (power-of-2 rounding
by integer carry), q = div_rn(x, scale) clamped to ±448, then rounded to E4M3 with integer arithmetic
(round to nearest even, subnormals kept) instead of the hardware cast, so that the Triton interpreter
(whose fp8 cast rounds differently) and the GPU give the same bytes as PyTorch. Outputs are written as
uint8 and viewed as float8_e4m3fn. The 128x1 kernel reads either high-precision rows or FP8 rows in
the 1x128 layout (dequantizing them with their scales) and writes the transposed tensor, 32 columns
per program (each column's 128-row block is independent), grouped blocks into 128-aligned slots
(`kernels.groups`). NaN propagates: a tile holding a NaN gets a NaN scale (the maximum keeps NaN),
NaN quantizes to the code 0x7F, and non-finite scales are not rounded to a power of 2. Row offsets
are computed in int64 (a tensor may pass 2^31 elements).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..fp8 import BLOCK, E4M3, E4M3_MAX, SCALE_FLOOR, cdiv
from ..groups import Counts, as_counts, row_blocks
from .launch import launch

_FLOOR = tl.constexpr(SCALE_FLOOR)
_FMAX = tl.constexpr(E4M3_MAX)


@triton.jit
def _amax(x, AXIS: tl.constexpr):
    """max |x| along AXIS, NaN when the slice holds a NaN (tl.max alone skips NaN)."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    has_nan = tl.max((x != x).to(tl.int32), axis=AXIS) > 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.maximum(tl.math.div_rn(amax, _FMAX), _FLOOR, propagate_nan=tl.PropagateNan.ALL)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)
        s = tl.where((bits & 0x7F800000) == 0x7F800000, s, rounded)
    return tl.where(s != s, float("nan"), s)


@triton.jit
def _e4m3_bits(x, s):
    """Bytes of E4M3FN(x / s): round to nearest even, subnormals included, saturated at ±448, NaN -> 0x7F."""
    q = tl.math.div_rn(x, s)
    q = tl.minimum(tl.maximum(q, -_FMAX, propagate_nan=tl.PropagateNan.ALL), _FMAX,
                   propagate_nan=tl.PropagateNan.ALL)
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (rounded >> 20) - 960
    sub = (tl.abs(q) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(mag < 0x3C800000, sub, normal) | sign
    return tl.where(q != q, 0x7F, code).to(tl.uint8)


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, M, K, KB, stride_xm, POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(x, 1), POW2)
    tl.store(q_ptr + rows64[:, None] * K + cols[None, :], _e4m3_bits(x, s[:, None]), mask=mask)
    tl.store(s_ptr + rows64 * KB + kb, s, mask=rows < M)


@triton.jit
def _quant_128x128_kernel(x_ptr, q_ptr, s_ptr, N, K, NB, KB, POW2: tl.constexpr):
    nb, kb, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = nb * 128 + tl.arange(0, 128)
    cols = kb * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = e.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(_amax(x, 1), 0), POW2)
    tl.store(q_ptr + offs, _e4m3_bits(x, s), mask=mask)
    tl.store(s_ptr + (e * NB + nb) * KB + kb, s)


@triton.jit
def _quant_128x1_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, start_ptr, end_ptr, M, K, NB, MQ, stride_xm, stride_xsm,
                        HAS_SCALE: tl.constexpr, POW2: tl.constexpr, GROUPED: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Block `blk` of 128 rows, BLOCK_K columns: written transposed to columns [128 blk, 128 blk + 128) of q."""
    blk, kc = tl.program_id(0), tl.program_id(1)
    if GROUPED:
        r0 = tl.load(start_ptr + blk)
        r1 = tl.load(end_ptr + blk)
    else:
        r0 = blk * 128
        r1 = tl.minimum(r0 + 128, M)
    rows = r0 + tl.arange(0, 128)
    slots = blk.to(tl.int64) * 128 + tl.arange(0, 128)
    cols = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < r1
    mask = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        kb = kc * BLOCK_K // 128
        x = x * tl.load(xs_ptr + rows.to(tl.int64) * stride_xsm + kb, mask=rmask, other=0.0)[:, None]
    s = _scale(_amax(x, 0), POW2)
    codes = tl.trans(_e4m3_bits(x, s[None, :]))
    tl.store(q_ptr + cols.to(tl.int64)[:, None] * MQ + slots[None, :], codes,
             mask=(cols[:, None] < K) & (slots[None, :] < MQ))
    tl.store(s_ptr + cols * NB + blk, s, mask=cols < K)


def quantize_1x128(x: torch.Tensor, pow2: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `kernels.fp8.quantize_1x128`."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, KB = x2.shape[0], cdiv(K, BLOCK)
    q = torch.empty(M, K, dtype=torch.uint8, device=x.device)
    s = torch.empty(M, KB, dtype=torch.float32, device=x.device)
    if M and K:
        launch(_quant_1x128_kernel, (cdiv(M, 32), KB), x2, q, s, M, K, KB, x2.stride(0), POW2=pow2, BLOCK_M=32)
    return q.view(E4M3).view(x.shape), s.view(*x.shape[:-1], KB)


def quantize_128x128(w: torch.Tensor, pow2: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `kernels.fp8.quantize_128x128` (leading dims are batched)."""
    N, K = w.shape[-2:]
    w3 = w.reshape(-1, N, K).contiguous()
    E, NB, KB = w3.shape[0], cdiv(N, BLOCK), cdiv(K, BLOCK)
    q = torch.empty(E, N, K, dtype=torch.uint8, device=w.device)
    s = torch.empty(E, NB, KB, dtype=torch.float32, device=w.device)
    if E and N and K:
        launch(_quant_128x128_kernel, (NB, KB, E), w3, q, s, N, K, NB, KB, POW2=pow2)
    return q.view(E4M3).view(w.shape), s.view(*w.shape[:-2], NB, KB)


QUANT_128X1_COLUMNS = 32


def quantize_128x1(x: torch.Tensor, pow2: bool = False, *, x_scale: Optional[torch.Tensor] = None,
                   counts: Optional[Counts] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `kernels.fp8.quantize_128x1`: transposed output (xt [K, M or 128 NB], scale [K, NB])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    if counts is None:
        starts = ends = None
        NB, MQ = cdiv(M, BLOCK), M
    else:
        _, starts, ends = row_blocks(as_counts(counts, x.device), M, BLOCK, x.device)
        NB = starts.numel()
        MQ = NB * BLOCK
    q = torch.empty(K, MQ, dtype=torch.uint8, device=x.device)
    s = torch.empty(K, NB, dtype=torch.float32, device=x.device)
    if NB and K:
        xs = x_scale if x_scale is not None else s
        table = (starts, ends) if counts is not None else (s, s)
        launch(_quant_128x1_kernel, (NB, cdiv(K, QUANT_128X1_COLUMNS)), x, xs, q, s, *table, M, K, NB, MQ,
               x.stride(0), xs.stride(0), HAS_SCALE=x_scale is not None, POW2=pow2, GROUPED=counts is not None,
               BLOCK_K=QUANT_128X1_COLUMNS)
    return q.view(E4M3), s
