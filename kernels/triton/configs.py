"""Launch configurations of the FP8 GEMM kernels (DeepSeek-V3 section 3.3), recorded here so that every
run (GPU, CPU interpreter tests, deterministic runs) uses the same ones.

A GEMM is classified by its operand scales: "fprop" (a per row, b per 128x128 block: Fprop and Dgrad,
dense or expert-grouped) and "wgrad" (both per row: the 128x1-quantized Wgrad operands, fp32 out).
Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages). They were chosen without a GPU, as the fastest
shapes that `python -m kernels.inspect` shows compiling for sm_90 and sm_100 without spills, with
wgmma / tcgen05 and pipelined loads at the v3_671b and tiny shapes: the Wgrad kernel scales its
accumulator by a per-column vector as well, which at 128x128 tiles pushes it past 255 registers,
hence 128x64 tiles with 4 stages. Re-measure them on a GPU (`python -m bench.fp8_gemm`) and record
changes here.
"""
from __future__ import annotations

from typing import NamedTuple


class GemmConfig(NamedTuple):
    """Tile shape and schedule of one GEMM launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


GEMM_CONFIGS = {
    "fprop": GemmConfig(128, 128, 8, 3),
    "wgrad": GemmConfig(128, 64, 8, 4),
}


def gemm_config(b_rows_scaled: bool) -> GemmConfig:
    """The configuration of a GEMM whose b operand has per-row (1x128) scales when `b_rows_scaled`."""
    return GEMM_CONFIGS["wgrad" if b_rows_scaled else "fprop"]
