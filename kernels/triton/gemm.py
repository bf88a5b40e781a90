"""Triton blockwise-scaled FP8 GEMMs (DeepSeek-V3 section 3.3.2, "increasing accumulation precision").

Every kernel computes a · bᵀ over K in steps of 128: the FP8 tensor-core product of one 128-wide
slice is accumulated in fp32 by `tl.dot`, then multiplied by the two operands' scales and added to
an fp32 accumulator (the promotion DeepSeek-V3 does on CUDA cores every 128 of K). Both operands are
K-major (contiguous along K, as Hopper's FP8 wgmma wants them): the backward GEMMs take the
transposed FP8 copies (`kernels.linear`), never a transposed view.

- `_gemm_kernel` computes one BLOCK_M x BLOCK_N tile. Plain GEMM: tile i covers rows
  [i BLOCK_M, (i + 1) BLOCK_M). M-grouped GEMM of expert Fprop/Dgrad (rows sorted by expert, each
  expert's rows times its own weight): tile i reads (expert, first row, end row) from a table built
  on the device (`kernels.groups.row_blocks`), padded with empty tiles to a bound known on the host.
  Scales of either operand are 1x128 (per row) or 128x128 (per block).
- `_gemm_grouped_k_kernel` is the expert Wgrad: per expert, the contraction runs over that expert's
  128-row blocks only, each at its 128-aligned columns of the grouped 128x1 layout.
Offsets are int64; NaN and Inf propagate to the output (the bf16 rounding keeps NaN).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..fp8 import BLOCK, cdiv, check_scale
from ..groups import Counts, as_counts, block_offsets, row_blocks
from .configs import gemm_config
from .launch import launch


@triton.jit
def _round_bf16(acc):
    """fp32 -> bf16 rounding to nearest even with integer ops (the interpreter's cast truncates); NaN stays NaN."""
    bits = acc.to(tl.int32, bitcast=True)
    bits = tl.where(acc != acc, 0x7FC00000, bits)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_g_ptr, tile_r0_ptr, tile_r1_ptr, M, N, K,
                 stride_am, stride_bg, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsg, stride_bsn,
                 stride_bsk, A_BLOCK: tl.constexpr, B_BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
                 GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    if GROUPED:
        g = tl.load(tile_g_ptr + tile).to(tl.int64)
        r0 = tl.load(tile_r0_ptr + tile)
        r1 = tl.load(tile_r1_ptr + tile)
    else:
        g = 0
        r0 = tile * BLOCK_M
        r1 = M
    rm = r0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    mmask, nmask = rm < r1, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    b_ptr += g * stride_bg
    bs_ptr += g * stride_bsg
    if A_BLOCK:
        sa_rows = rm // 128
    else:
        sa_rows = rm64
    if B_BLOCK:
        sb_rows = rn // 128
    else:
        sb_rows = rn64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_k = tl.where(r0 < r1, tl.cdiv(K, 128), 0)
    for kb in range(0, n_k):
        k = kb * 128 + rk
        kmask = k < K
        a = tl.load(a_ptr + rm64[:, None] * stride_am + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + rn64[:, None] * stride_bn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        part = tl.dot(a, tl.trans(b))
        sa = tl.load(as_ptr + sa_rows * stride_asm + kb * stride_ask, mask=mmask, other=0.0)
        sb = tl.load(bs_ptr + sb_rows * stride_bsn + kb * stride_bsk, mask=nmask, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    if OUT_BF16:
        out = _round_bf16(acc)
    else:
        out = acc
    tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], out, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemm_grouped_k_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, blk_off_ptr, N, K, stride_am, stride_bn,
                           stride_asm, stride_bsn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    blk0 = tl.load(blk_off_ptr + g)
    blk1 = tl.load(blk_off_ptr + g + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    mmask, nmask = rm < N, rn < K
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for blk in range(blk0, blk1):
        k = blk * 128 + rk
        a = tl.load(a_ptr + rm64[:, None] * stride_am + k[None, :], mask=mmask[:, None], other=0.0)
        b = tl.load(b_ptr + rn64[:, None] * stride_bn + k[None, :], mask=nmask[:, None], other=0.0)
        part = tl.dot(a, tl.trans(b))
        sa = tl.load(as_ptr + rm64 * stride_asm + blk, mask=mmask, other=0.0)
        sb = tl.load(bs_ptr + rn64 * stride_bsn + blk, mask=nmask, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    c_offs = g.to(tl.int64) * N * K + rm64[:, None] * K + rn[None, :]
    tl.store(c_ptr + c_offs, acc, mask=mmask[:, None] & nmask[None, :])


def _k_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(a, a_scale, b3, b_scale3, counts: Optional[torch.Tensor], out_dtype, a_block: bool,
            b_block: bool) -> torch.Tensor:
    """Run `_gemm_kernel` into fp32 or bf16 (written by the kernel), any other dtype cast from fp32."""
    a, b3 = _k_major(a), _k_major(b3)
    M, N, K = a.shape[0], b3.shape[1], b3.shape[2]
    cfg = gemm_config(not b_block)
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(M, N, dtype=kernel_dtype, device=a.device)
    if counts is None:
        tiles = (a_scale, a_scale, a_scale)
        n_tiles = cdiv(M, cfg.block_m)
    else:
        tiles = row_blocks(counts, M, cfg.block_m, a.device)
        n_tiles = tiles[0].numel()
    if n_tiles and N:
        launch(_gemm_kernel, (n_tiles, cdiv(N, cfg.block_n)), a, b3, out, a_scale, b_scale3, *tiles, M, N, K,
               a.stride(0), b3.stride(0), b3.stride(1), out.stride(0), a_scale.stride(0), a_scale.stride(1),
               b_scale3.stride(0), b_scale3.stride(1), b_scale3.stride(2), A_BLOCK=a_block, B_BLOCK=b_block,
               OUT_BF16=kernel_dtype == torch.bfloat16, GROUPED=counts is not None, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(out_dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm` (a [M, K] · b [N, K]ᵀ; an operand not contiguous along K is copied)."""
    check_scale("fp8_gemm operand a", a, a_scale)
    check_scale("fp8_gemm operand b", b, b_scale)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: K differs, a {tuple(a.shape)} vs b {tuple(b.shape)}")
    M, N = a.shape[0], b.shape[0]
    return _launch(a, a_scale, b.unsqueeze(0), b_scale.unsqueeze(0), None, out_dtype,
                   a_block=a_scale.shape[0] != M, b_block=b_scale.shape[0] != N)


def fp8_gemm_grouped_m(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Optional[Counts], out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm_grouped_m` (expert Fprop / Dgrad; counts None: one group)."""
    counts_t = None if counts is None else as_counts(counts, a.device)
    return _launch(a, a_scale, b, b_scale, counts_t, out_dtype, a_block=False, b_block=True)


def fp8_gemm_grouped_k(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Optional[Counts]) -> torch.Tensor:
    """Triton version of `kernels.fp8.fp8_gemm_grouped_k` (expert Wgrad, fp32 [E, N, K])."""
    if counts is None:
        return fp8_gemm(a, a_scale, b, b_scale, torch.float32).unsqueeze(0)
    a, b = _k_major(a), _k_major(b)
    counts_t = as_counts(counts, a.device)
    N, K, E = a.shape[0], b.shape[0], counts_t.numel()
    cfg = gemm_config(True)
    out = torch.empty(E, N, K, dtype=torch.float32, device=a.device)
    if E and N and K:
        launch(_gemm_grouped_k_kernel, (cdiv(N, cfg.block_m), cdiv(K, cfg.block_n), E), a, b, out, a_scale,
               b_scale, block_offsets(counts_t, BLOCK), N, K, a.stride(0), b.stride(0), a_scale.stride(0),
               b_scale.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
    return out
