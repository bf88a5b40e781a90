"""Triton blockwise-scaled FP8 GEMMs (DeepSeek-V3 section 3.3.2, "increasing accumulation precision").

Every kernel computes a · bᵀ over K in steps of 128: the FP8 tensor-core product of one 128-wide
slice is accumulated in fp32 by `tl.dot`, then multiplied by the two operands' scales and added to
an fp32 accumulator (the promotion DeepSeek-V3 does on CUDA cores every 128 of K).

- `_gemm_kernel` walks a table of row tiles (group, first row, end row): one group for a plain
  GEMM, one group per expert for the M-grouped GEMM of expert Fprop/Dgrad (rows sorted by expert,
  each expert's rows times its own weight). Scales of either operand are 1x128 (per row) or
  128x128 (per block); operands are read through strides, so Dgrad reads the weight transposed
  in place.
- `_gemm_grouped_k_kernel` is the expert Wgrad: per expert, the contraction runs over that expert's
  rows only, with the 128x1 scales of blocks that restart at every expert.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..fp8 import BLOCK, cdiv, check_scale
from .launch import launch

BM, BN = 128, 128


@triton.jit
def _round_bf16(acc):
    """fp32 -> bf16 rounding to nearest even with integer ops (the interpreter's cast truncates)."""
    bits = acc.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_g_ptr, tile_r0_ptr, tile_r1_ptr, N, K,
                 stride_am, stride_ak, stride_bg, stride_bn, stride_bk, stride_cm, stride_cn,
                 stride_asm, stride_ask, stride_bsg, stride_bsn, stride_bsk,
                 A_BLOCK: tl.constexpr, B_BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_g_ptr + tile).to(tl.int64)
    r0 = tl.load(tile_r0_ptr + tile)
    r1 = tl.load(tile_r1_ptr + tile)
    rm = r0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    mmask, nmask = rm < r1, rn < N
    b_ptr += g * stride_bg
    bs_ptr += g * stride_bsg
    if A_BLOCK:
        sa_rows = rm // 128
    else:
        sa_rows = rm
    if B_BLOCK:
        sb_rows = rn // 128
    else:
        sb_rows = rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, 128)):
        k = kb * 128 + rk
        kmask = k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + k[None, :] * stride_bk,
                    mask=nmask[:, None] & kmask[None, :], other=0.0)
        part = tl.dot(a, tl.trans(b))
        sa = tl.load(as_ptr + sa_rows * stride_asm + kb * stride_ask, mask=mmask, other=0.0)
        sb = tl.load(bs_ptr + sb_rows * stride_bsn + kb * stride_bsk, mask=nmask, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    if OUT_BF16:
        out = _round_bf16(acc)
    else:
        out = acc
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemm_grouped_k_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, row_off_ptr, blk_off_ptr, N, K,
                           stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
                           stride_bsn, stride_bsk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo = tl.load(row_off_ptr + g)
    hi = tl.load(row_off_ptr + g + 1)
    blk0 = tl.load(blk_off_ptr + g)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    mmask, nmask = rm < N, rn < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(hi - lo, 128)):
        k = lo + j * 128 + rk
        kmask = k < hi
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + k[None, :] * stride_bk,
                    mask=nmask[:, None] & kmask[None, :], other=0.0)
        part = tl.dot(a, tl.trans(b))
        sa = tl.load(as_ptr + rm * stride_asm + (blk0 + j) * stride_ask, mask=mmask, other=0.0)
        sb = tl.load(bs_ptr + rn * stride_bsn + (blk0 + j) * stride_bsk, mask=nmask, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    c_offs = g.to(tl.int64) * N * K + rm[:, None] * K + rn[None, :]
    tl.store(c_ptr + c_offs, acc, mask=mmask[:, None] & nmask[None, :])


def _row_tiles(counts: Sequence[int], device: torch.device):
    groups, r0s, r1s, row = [], [], [], 0
    for g, c in enumerate(counts):
        for start in range(row, row + int(c), BM):
            groups.append(g)
            r0s.append(start)
            r1s.append(min(start + BM, row + int(c)))
        row += int(c)
    return [torch.tensor(v, dtype=torch.int32, device=device) for v in (groups, r0s, r1s)]


def _launch(a, a_scale, b3, b_scale3, counts, out_dtype, a_block: bool, b_block: bool) -> torch.Tensor:
    """Run `_gemm_kernel` into fp32 or bf16 (written by the kernel), any other dtype cast from fp32."""
    tiles_g, tiles_r0, tiles_r1 = _row_tiles(counts, a.device)
    N, K = b3.shape[1], b3.shape[2]
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(a.shape[0], N, dtype=kernel_dtype, device=a.device)
    if tiles_g.numel() and N:
        grid = (tiles_g.numel(), cdiv(N, BN))
        launch(_gemm_kernel, grid, a, b3, out, a_scale, b_scale3, tiles_g, tiles_r0, tiles_r1, N, K,
                           a.stride(0), a.stride(1), b3.stride(0), b3.stride(1), b3.stride(2),
                           out.stride(0), out.stride(1), a_scale.stride(0), a_scale.stride(1),
                           b_scale3.stride(0), b_scale3.stride(1), b_scale3.stride(2),
                           A_BLOCK=a_block, B_BLOCK=b_block, OUT_BF16=kernel_dtype == torch.bfloat16,
                           BLOCK_M=BM, BLOCK_N=BN, num_warps=8, num_stages=3)
    return out.to(out_dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm` (a [M, K] · b [N, K]ᵀ, any strides)."""
    check_scale("fp8_gemm operand a", a, a_scale)
    check_scale("fp8_gemm operand b", b, b_scale)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: K differs, a {tuple(a.shape)} vs b {tuple(b.shape)}")
    M, N = a.shape[0], b.shape[0]
    return _launch(a, a_scale, b.unsqueeze(0), b_scale.unsqueeze(0), [M], out_dtype,
                   a_block=a_scale.shape[0] != M, b_block=b_scale.shape[0] != N)


def fp8_gemm_grouped_m(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Sequence[int], out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm_grouped_m` (expert Fprop / Dgrad)."""
    return _launch(a, a_scale, b, b_scale, counts, out_dtype, a_block=False, b_block=True)


def fp8_gemm_grouped_k(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Sequence[int]) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm_grouped_k` (expert Wgrad, fp32 [E, N, K])."""
    N, K, E = a.shape[0], b.shape[0], len(counts)
    row_off, blk_off = [0], [0]
    for c in counts:
        row_off.append(row_off[-1] + int(c))
        blk_off.append(blk_off[-1] + cdiv(int(c), BLOCK))
    out = torch.empty(E, N, K, dtype=torch.float32, device=a.device)
    if E and N and K:
        row_off_t = torch.tensor(row_off, dtype=torch.int32, device=a.device)
        blk_off_t = torch.tensor(blk_off, dtype=torch.int32, device=a.device)
        launch(
            _gemm_grouped_k_kernel, (cdiv(N, BM), cdiv(K, BN), E), a, b, out, a_scale, b_scale, row_off_t, blk_off_t, N, K, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
            BLOCK_M=BM, BLOCK_N=BN, num_warps=8, num_stages=3)
    return out
