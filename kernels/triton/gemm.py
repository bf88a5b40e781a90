"""Triton blockwise-scaled FP8 GEMMs (DeepSeek-V3 section 3.3.2, "increasing accumulation precision").

Every kernel computes a · bᵀ over K in steps of 128: the FP8 tensor-core product of one 128-wide
slice is accumulated in fp32 by `tl.dot`, then multiplied by the two operands' scales and added to
an fp32 accumulator (the promotion DeepSeek-V3 does on CUDA cores every 128 of K). Both operands are
K-major (contiguous along K, as Hopper's FP8 wgmma wants them): the backward GEMMs take the
transposed FP8 copies (`kernels.linear`), never a transposed view.

Both kernels are persistent: a fixed grid of programs (one per SM on a GPU, `persistent_programs`)
walks a list of output tiles, program p taking tiles p, p + P, p + 2P, ... in the grouped launch
order of `_tile_coords` (GROUP_M row tiles share each sweep over the column tiles).
- `_gemm_kernel` computes BLOCK_M x BLOCK_N tiles. Plain GEMM: row tile i covers rows
  [i BLOCK_M, (i + 1) BLOCK_M). M-grouped GEMM of expert Fprop/Dgrad (rows sorted by expert, each
  expert's rows times its own weight): row tile i reads (expert, first row, end row) from a table
  built on the device (`kernels.groups.row_blocks`), and the walk ends at the number of real row
  tiles, read on the device (`kernels.groups.block_offsets`): no program visits a tile of an empty
  expert or of the padding, and nothing is read back to the host.
- `_gemm_grouped_k_kernel` is the expert Wgrad: per expert, the contraction runs over that expert's
  128-row blocks only, each at its 128-aligned columns of the grouped 128x1 layout. Its tiles are
  walked expert by expert, the experts in decreasing order of rows (the longest contractions first);
  an expert without rows gets zero tiles without a contraction.
Offsets are int64; NaN and Inf propagate to the output (the bf16 rounding keeps NaN). Which program
computes a tile changes nothing in its arithmetic: results do not depend on the number of programs.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..fp8 import BLOCK, cdiv, check_scale
from ..groups import Counts, as_counts, block_offsets, blocks_bound, row_blocks
from .configs import gemm_config
from .launch import launch

INTERPRETER_PROGRAMS = 3  # programs of a persistent launch off CUDA (an odd count: uneven walks are tested)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, tiles: int) -> int:
    """Programs of a persistent launch over at most `tiles` tiles: one per SM on CUDA, never more than tiles."""
    if device.type == "cuda":
        per_device = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        per_device = INTERPRETER_PROGRAMS
    return min(per_device, tiles)


@triton.jit
def _round_bf16(acc):
    """fp32 -> bf16 rounding to nearest even with integer ops (the interpreter's cast truncates); NaN stays NaN."""
    bits = acc.to(tl.int32, bitcast=True)
    bits = tl.where(acc != acc, 0x7FC00000, bits)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _tile_coords(t, n_m, n_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the t-th tile: groups of GROUP_M row tiles, column-major inside a group."""
    per_group = GROUP_M * n_n
    first_m = (t // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    local = t % per_group
    return first_m + local % size_m, local // size_m


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_g_ptr, tile_r0_ptr, tile_r1_ptr, n_tiles_ptr, M, N, K,
                 stride_am, stride_bg, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsg, stride_bsn,
                 stride_bsk, A_BLOCK: tl.constexpr, B_BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
                 GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    n_n = tl.cdiv(N, BLOCK_N)
    if GROUPED:
        n_m = tl.load(n_tiles_ptr)
    else:
        n_m = tl.cdiv(M, BLOCK_M)
    rk = tl.arange(0, 128)
    offs_m, offs_n = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    for t in range(tl.program_id(0), n_m * n_n, tl.num_programs(0)):
        tile, pid_n = _tile_coords(t, n_m, n_n, GROUP_M)
        if GROUPED:
            g = tl.load(tile_g_ptr + tile).to(tl.int64)
            r0 = tl.load(tile_r0_ptr + tile)
            r1 = tl.load(tile_r1_ptr + tile)
        else:
            g = 0
            r0 = tile * BLOCK_M
            r1 = M
        rm = r0 + offs_m
        rn = pid_n * BLOCK_N + offs_n
        mmask, nmask = rm < r1, rn < N
        # 64-bit offset of the tile, 32-bit offsets inside it: fewer registers than 64-bit offsets per element
        a_tile = a_ptr + r0.to(tl.int64) * stride_am + (offs_m[:, None] * stride_am + rk[None, :])
        b_tile = b_ptr + g * stride_bg + (pid_n * BLOCK_N).to(tl.int64) * stride_bn + \
            (offs_n[:, None] * stride_bn + rk[None, :])
        bs_tile = bs_ptr + g * stride_bsg
        if A_BLOCK:
            sa_rows = rm // 128
        else:
            sa_rows = rm.to(tl.int64)
        if B_BLOCK:
            sb_rows = rn // 128
        else:
            sb_rows = rn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, 128)):
            kmask = kb * 128 + rk < K
            a = tl.load(a_tile + kb * 128, mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_tile + kb * 128, mask=nmask[:, None] & kmask[None, :], other=0.0)
            part = tl.dot(a, tl.trans(b))
            sa = tl.load(as_ptr + sa_rows * stride_asm + kb * stride_ask, mask=mmask, other=0.0)
            sb = tl.load(bs_tile + sb_rows * stride_bsn + kb * stride_bsk, mask=nmask, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        if OUT_BF16:
            out = _round_bf16(acc)
        else:
            out = acc
        c_tile = c_ptr + r0.to(tl.int64) * stride_cm + pid_n * BLOCK_N
        tl.store(c_tile + (offs_m[:, None] * stride_cm + offs_n[None, :]), out, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _gemm_grouped_k_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, blk_off_ptr, order_ptr, E, N, K, stride_am,
                           stride_bn, stride_asm, stride_bsn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           GROUP_M: tl.constexpr):
    n_m, n_n = tl.cdiv(N, BLOCK_M), tl.cdiv(K, BLOCK_N)
    per_expert = n_m * n_n
    rk = tl.arange(0, 128)
    offs_m, offs_n = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    for t in range(tl.program_id(0), E * per_expert, tl.num_programs(0)):
        g = tl.load(order_ptr + t // per_expert)
        pid_m, pid_n = _tile_coords(t % per_expert, n_m, n_n, GROUP_M)
        blk0 = tl.load(blk_off_ptr + g)
        blk1 = tl.load(blk_off_ptr + g + 1)
        rm = pid_m * BLOCK_M + offs_m
        rn = pid_n * BLOCK_N + offs_n
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
        c_offs = g * N * K + rm64[:, None] * K + rn[None, :]
        tl.store(c_ptr + c_offs, acc, mask=mmask[:, None] & nmask[None, :])


def _k_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(a, a_scale, b3, b_scale3, counts: Optional[torch.Tensor], out_dtype, a_block: bool,
            b_block: bool) -> torch.Tensor:
    """Run `_gemm_kernel` into fp32 or bf16 (written by the kernel), any other dtype cast from fp32."""
    a, b3 = _k_major(a), _k_major(b3)
    M, N, K = a.shape[0], b3.shape[1], b3.shape[2]
    kind = ("wgrad" if not b_block else "fprop") + ("_grouped" if counts is not None else "")
    cfg = gemm_config(kind, N, K)
    kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.empty(M, N, dtype=kernel_dtype, device=a.device)
    if counts is None:
        tiles = (a_scale, a_scale, a_scale, a_scale)
        m_tiles = cdiv(M, cfg.block_m)
    else:
        tiles = (*row_blocks(counts, M, cfg.block_m, a.device), block_offsets(counts, cfg.block_m)[-1:])
        m_tiles = blocks_bound(M, counts.numel(), cfg.block_m)
    programs = persistent_programs(a.device, m_tiles * cdiv(N, cfg.block_n))
    if programs:
        launch(_gemm_kernel, (programs,), a, b3, out, a_scale, b_scale3, *tiles, M, N, K,
               a.stride(0), b3.stride(0), b3.stride(1), out.stride(0), a_scale.stride(0), a_scale.stride(1),
               b_scale3.stride(0), b_scale3.stride(1), b_scale3.stride(2), A_BLOCK=a_block, B_BLOCK=b_block,
               OUT_BF16=kernel_dtype == torch.bfloat16, GROUPED=counts is not None, BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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
    cfg = gemm_config("wgrad_grouped", N, K)
    out = torch.empty(E, N, K, dtype=torch.float32, device=a.device)
    programs = persistent_programs(a.device, E * cdiv(N, cfg.block_m) * cdiv(K, cfg.block_n))
    if programs:
        order = torch.argsort(counts_t, descending=True, stable=True)
        launch(_gemm_grouped_k_kernel, (programs,), a, b, out, a_scale, b_scale, block_offsets(counts_t, BLOCK),
               order, E, N, K, a.stride(0), b.stride(0), a_scale.stride(0), b_scale.stride(0), BLOCK_M=cfg.block_m,
               BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
