"""FP8 fine-grained quantization and blockwise GEMMs: the plain-PyTorch reference that defines the numerics.

DeepSeek-V3 report, section 3.3 (FP8 training): activations are scaled per 1x128 tile (per token, per
128 channels) in the forward pass and per 128x1 tile (per 128 tokens of a channel) for the weight
gradient; weights per 128x128 block. scale = max(amax / 448, 2^-126) (448: E4M3's largest value;
2^-126: the smallest normal fp32, so that an all-zero tile still has a finite, normal scale), optionally
rounded up to a power of 2; x_fp8 = round_to_nearest_even(x / scale). The floor sits on the scale, not on
amax: in a training step of the tiny model nearly every tile of the gradients entering the FP8 GEMMs has
amax < 1e-4 (down to 1e-13), and an amax floor such as 1e-4 put such tiles on E4M3's few subnormal codes
or to zero. `fp8_gemm` multiplies FP8 operands and promotes the fp32 partial sum of every 128-wide block
of K to the fp32 accumulator, applying both operands' scales there; the grouped (expert) GEMMs apply the
scales to the operands and accumulate in fp32, which is the same product up to fp32 rounding. The input
of the linear after attention is cached in E5M6 (section 3.3.2), emulated here as 12-bit codes packed
two per three bytes with power-of-2 scales.

Layouts: a "1x128" scale of x [..., M, K] is [..., M, ceil(K/128)]; a "128x128" scale is
[..., ceil(M/128), ceil(K/128)]. `quantize_128x1` returns the *transposed* data [K, M] with a 1x128
scale [K, ceil(M/128)], ready to be an operand of `fp8_gemm` whose contraction runs over M.
Shapes that are not multiples of 128 are padded with zeros inside (the last tile is partial).
NaN and Inf propagate: a tile holding a NaN gets a NaN scale and NaN codes (0x7F), non-finite scales
are not rounded to a power of 2, and `decode_e4m3` decodes the NaN codes to NaN.
`kernels/triton/` implements the same functions and must agree bit for bit (GEMMs: to fp32 rounding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .groups import Counts, as_counts, block_offsets, row_blocks

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E5M6_MAX = 65024.0  # (2 - 2**-6) * 2**15
SCALE_FLOOR = 2.0 ** -126


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of 2 >= scale (positive normal fp32), by clearing the mantissa after a carry; NaN and Inf kept."""
    scale = scale.float().contiguous()
    rounded = ((scale.view(torch.int32) + 0x7FFFFF) & -0x800000).view(torch.float32)
    return torch.where(torch.isfinite(scale), rounded, scale)


def compute_scale(amax: torch.Tensor, pow2: bool = False, fmt_max: float = E4M3_MAX) -> torch.Tensor:
    """scale = max(amax / fmt_max, 2^-126) in fp32, rounded up to a power of 2 when `pow2`."""
    scale = (amax.float() / fmt_max).clamp_min(SCALE_FLOOR)
    return round_up_pow2(scale) if pow2 else scale


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3(x / scale) saturated at ±448; NaN (a NaN in the tile makes its scale NaN) -> the code 0x7F."""
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(E4M3).view(torch.uint8).masked_fill_(q.isnan(), 0x7F).view(E4M3)


def quantize_1x128(x: torch.Tensor, pow2: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per 128 contiguous elements of the last dim: (x_fp8 like x, scale [..., ceil(K/128)] fp32)."""
    K = x.shape[-1]
    xp = _pad_last(x.float(), BLOCK)
    tiles = xp.view(*xp.shape[:-1], xp.shape[-1] // BLOCK, BLOCK)
    scale = compute_scale(tiles.abs().amax(dim=-1), pow2)
    q = _to_e4m3(tiles, scale.unsqueeze(-1)).view(xp.shape)[..., :K]
    return q.contiguous(), scale


def quantize_128x128(w: torch.Tensor, pow2: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block of the last two dims: (w_fp8 like w, scale [..., ceil(N/128), ceil(K/128)])."""
    N, K = w.shape[-2:]
    wp = _pad_last(_pad_last(w.float(), BLOCK).transpose(-1, -2), BLOCK).transpose(-1, -2)
    Nb, Kb = wp.shape[-2] // BLOCK, wp.shape[-1] // BLOCK
    blocks = wp.reshape(*wp.shape[:-2], Nb, BLOCK, Kb, BLOCK)
    scale = compute_scale(blocks.abs().amax(dim=(-3, -1)), pow2)
    q = _to_e4m3(blocks, scale[..., :, None, :, None]).reshape(wp.shape)[..., :N, :K]
    return q.contiguous(), scale


def quantize_128x1(x: torch.Tensor, pow2: bool = False, *, x_scale: Optional[torch.Tensor] = None,
                   counts: Optional[Counts] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per 128 rows of each column of x [M, K]; returns the transposed (xt_fp8 [K, *], scale [K, NB]).

    With `x_scale`, x is FP8 in the 1x128 layout and is dequantized first (the backward pass's
    re-quantization of a cached activation). Without `counts`: xt [K, M], NB = ceil(M / 128). With
    `counts` (list or tensor), the rows form consecutive groups (tokens sorted by expert) and blocks
    restart at each group: NB = `groups.blocks_bound(M, E, 128)` and block b fills columns
    [128 b, 128 b + 128) of xt [K, 128 NB], zero past its group's end (`groups.row_blocks`).
    """
    xf = dequantize(x, x_scale) if x_scale is not None else x.float()
    if counts is not None:
        _, starts, ends = row_blocks(as_counts(counts, x.device), xf.shape[0], BLOCK, x.device)
        rows = starts.long()[:, None] + torch.arange(BLOCK, device=x.device)
        inside = (rows < ends.long()[:, None]).reshape(-1, 1)
        gathered = xf[rows.reshape(-1).clamp_max(max(xf.shape[0] - 1, 0))] if xf.shape[0] else \
            xf.new_zeros(rows.numel(), xf.shape[1])
        xf = torch.where(inside, gathered, 0.0)
    M, K = xf.shape
    NB = cdiv(M, BLOCK)
    xp = torch.nn.functional.pad(xf, (0, 0, 0, NB * BLOCK - M))
    scale = compute_scale(xp.view(NB, BLOCK, K).abs().amax(dim=1), pow2)
    q = _to_e4m3(xf, scale.repeat_interleave(BLOCK, dim=0)[:M])
    return q.t().contiguous(), scale.t().contiguous()


def _expand_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Scale of shape [..., rows or ceil(rows/128), ceil(cols/128)] -> one factor per element."""
    s = scale.repeat_interleave(BLOCK, dim=-1)[..., :cols]
    if scale.shape[-2] != rows:
        s = s.repeat_interleave(BLOCK, dim=-2)[..., :rows, :]
    return s


def check_scale(name: str, x: torch.Tensor, scale: torch.Tensor) -> None:
    """Raise ValueError naming `name` unless `scale` is a 1x128 or 128x128 scale of x's last two dims."""
    rows, cols = x.shape[-2], x.shape[-1]
    if scale.shape[-1] != cdiv(cols, BLOCK) or scale.shape[-2] not in (rows, cdiv(rows, BLOCK)):
        raise ValueError(f"{name}: scale shape {tuple(scale.shape)} fits neither 1x128 "
                         f"[{rows}, {cdiv(cols, BLOCK)}] nor 128x128 [{cdiv(rows, BLOCK)}, "
                         f"{cdiv(cols, BLOCK)}] tiles of a tensor of shape {tuple(x.shape)}")


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_fp8 * scale, the tiling (1x128 or 128x128) read from the scale's shape."""
    if x_fp8.dim() == 1:
        return dequantize(x_fp8.unsqueeze(0), scale.unsqueeze(0), out_dtype).squeeze(0)
    check_scale("dequantize", x_fp8, scale)
    return (decode_e4m3(x_fp8) * _expand_scale(scale, *x_fp8.shape[-2:])).to(out_dtype)


def decode_e4m3(x_fp8: torch.Tensor) -> torch.Tensor:
    """Exact fp32 values of E4M3 data (the NaN codes 0x7F / 0xFF -> NaN), faster on CPU than `.float()`.

    Shifting the 7 magnitude bits into an fp16 exponent/mantissa gives value * 2**-8 for normal and
    subnormal codes alike (both formats keep the leading bit implicit), so one fp16 -> fp32 cast remains.
    """
    u = x_fp8.view(torch.uint8).to(torch.int16)
    half_bits = ((u & 0x7F) << 7) | ((u & 0x80) << 8)
    half_bits = torch.where((u & 0x7F) == 0x7F, 0x7E00, half_bits)
    return half_bits.view(torch.float16).float() * 256.0


def _row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """One scale per row and K block: 128x128 block scales are repeated over their 128 rows."""
    return scale if scale.shape[0] == rows else scale.repeat_interleave(BLOCK, dim=0)[:rows]


def _gemm_f32(af: torch.Tensor, sa: torch.Tensor, bf: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """sum over K blocks of (af_blk · bf_blkᵀ) * sa[:, kb] * sb[:, kb] in fp32 (operands already decoded)."""
    acc = torch.zeros(af.shape[0], bf.shape[0], dtype=torch.float32, device=af.device)
    with torch.autocast(device_type=af.device.type, enabled=False):
        for kb in range(cdiv(af.shape[1], BLOCK)):
            ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
            acc += (af[:, ks] @ bf[:, ks].t()) * sa[:, kb, None] * sb[None, :, kb]
    return acc


def _check_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    check_scale("fp8_gemm operand a", a, a_scale)
    check_scale("fp8_gemm operand b", b, b_scale)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"fp8_gemm: K differs, a {tuple(a.shape)} vs b {tuple(b.shape)}")


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ of FP8 operands with 1x128 or 128x128 scales; fp32 promotion per 128 of K.

    For every 128-wide block of K the exact products are summed in fp32, multiplied by both
    operands' scales and added to an fp32 accumulator; the result is cast to `out_dtype`.
    """
    _check_gemm(a, a_scale, b, b_scale)
    acc = _gemm_f32(decode_e4m3(a), _row_scales(a_scale, a.shape[0]),
                    decode_e4m3(b), _row_scales(b_scale, b.shape[0]))
    return acc.to(out_dtype)


def _pad_dim(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if not pad:
        return x.contiguous()
    widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
    return torch.nn.functional.pad(x, widths).contiguous()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped fp32 matmul: a [M, K] · b [E, K, N] by row groups, or a [N, M] · b [M, K] by M groups.

    CPU: torch._grouped_mm, whose operands need 16-byte strides (dims zero-padded to a multiple of 4);
    elsewhere a loop (CUDA's grouped mm takes bf16 only).
    """
    n = b.shape[-1]
    if a.device.type == "cpu":
        if b.dim() == 3:
            out = torch._grouped_mm(_pad_dim(a, 1, 4), _pad_dim(_pad_dim(b, 1, 4), 2, 4), offs=offs)
        else:
            out = torch._grouped_mm(_pad_dim(a, 1, 4), _pad_dim(_pad_dim(b, 0, 4), 1, 4), offs=offs)
        return out[..., :n]
    bounds = [0] + offs.tolist()
    if b.dim() == 3:
        return torch.cat([a[lo:hi] @ b[g] for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    return torch.stack([a[:, lo:hi] @ b[lo:hi] for lo, hi in zip(bounds, bounds[1:])])


def fp8_gemm_grouped_m(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Optional[Counts], out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows of a [M, K] (1x128 scales) sorted by group, counts[e] rows each (None: one group): out rows
    of group e = a_e · b[e]ᵀ with b [E, N, K] (128x128 scales [E, ceil(N/128), ceil(K/128)]). Fprop and
    Dgrad of experts.

    The scales are applied to the operands in fp32 and each group's product accumulates in fp32:
    `fp8_gemm`'s per-block promotion up to fp32 rounding, in one grouped matmul.
    """
    _check_gemm(a, a_scale, b, b_scale)
    counts = as_counts([a.shape[0]] if counts is None else counts, a.device)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        out = _grouped_mm(dequantize(a, a_scale), dequantize(b, b_scale).transpose(1, 2), offs)
    return out.to(out_dtype)


def fp8_gemm_grouped_k(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       counts: Optional[Counts]) -> torch.Tensor:
    """Per group e, a[:, cols of e] · b[:, cols of e]ᵀ -> fp32 [E, N, K]: the experts' weight gradients.

    a [N, 128 NB] and b [K, 128 NB] come from `quantize_128x1(..., counts=counts)` (blocks restarting at
    every group, block b in columns [128 b, 128 b + 128)); `counts` None means one group, the plain
    [N, M] / [K, M] layout. A group with no rows gets a zero gradient. Accumulation as in `fp8_gemm_grouped_m`.
    """
    if counts is None:
        offs = torch.tensor([a.shape[1]], dtype=torch.int32, device=a.device)
    else:
        offs = (block_offsets(as_counts(counts, a.device))[1:] * BLOCK).clamp_max(a.shape[1])
    a_deq = decode_e4m3(a) * a_scale.repeat_interleave(BLOCK, dim=1)[:, :a.shape[1]]
    b_deq = decode_e4m3(b) * b_scale.repeat_interleave(BLOCK, dim=1)[:, :b.shape[1]]
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _grouped_mm(a_deq, b_deq.t(), offs)


def _round_e5m6(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (|v| <= E5M6_MAX) to the nearest E5M6 number, ties to even."""
    bits = v.view(torch.int32)
    normal = ((bits + 0xFFFF + ((bits >> 17) & 1)) & -0x20000).view(torch.float32)
    subnormal = torch.round(v * 2.0 ** 20) * 2.0 ** -20
    return torch.where(v.abs() < 2.0 ** -14, subnormal, normal)


def quantize_e5m6(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """E5M6 (1 sign, 5 exponent, 6 mantissa bits) per 1x128 tile with power-of-2 scales.

    Returns (packed uint8 [..., 3 * ceil(K/2)]: two 12-bit codes in three bytes, scale [..., ceil(K/128)]).
    """
    K = x.shape[-1]
    xp = _pad_last(x.float(), BLOCK)
    tiles = xp.view(*xp.shape[:-1], xp.shape[-1] // BLOCK, BLOCK)
    scale = compute_scale(tiles.abs().amax(dim=-1), pow2=True, fmt_max=E5M6_MAX)
    v = _round_e5m6((tiles / scale.unsqueeze(-1)).contiguous()).view(xp.shape)[..., :K]
    codes = (v.half().view(torch.int16).to(torch.int32) >> 4) & 0xFFF
    codes = _pad_last(codes, 2)
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    packed = torch.stack([lo & 0xFF, (lo >> 8) | ((hi & 0xF) << 4), hi >> 4], dim=-1)
    return packed.flatten(-2).to(torch.uint8), scale


def dequantize_e5m6(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `quantize_e5m6` for a last dim of size k: fp32 [..., k]."""
    b = packed.view(*packed.shape[:-1], -1, 3).to(torch.int32)
    lo = b[..., 0] | ((b[..., 1] & 0xF) << 8)
    hi = (b[..., 1] >> 4) | (b[..., 2] << 4)
    half_bits = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :k] << 4
    half_bits = torch.where(half_bits >= 0x8000, half_bits - 0x10000, half_bits)
    v = half_bits.to(torch.int16).view(torch.float16).float()
    return v * scale.repeat_interleave(BLOCK, dim=-1)[..., :k]
