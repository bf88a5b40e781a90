"""Blockwise-scaled FP8 GEMM throughput on a GPU (DeepSeek-V3 section 3.3) against torch's bf16 and FP8 GEMMs.

TFLOP/s (2·M·N·K per GEMM) of `kernels.ops.fp8_gemm` (operands already quantized: 1x128 activation
tiles, 128x128 weight blocks, promotion every 128 of K) at M = 4096 tokens and the N, K of v3_671b's
projections, and of the M-grouped expert GEMM (`fp8_gemm_grouped_m`, gate/up and down projections)
with 8, 16 and 32 experts per rank (4096, 2048, 1024 rows each: 4096 tokens x top-8 over 256 experts
on 32, 16, 8 EP ranks). Peers: torch's bf16 matmul (`torch._grouped_mm` for experts) and, where the
installed torch has it, `torch._scaled_mm` with the same blockwise scales (1x128 x 128x128), else
with rowwise scales (said in the case). The Triton kernels need a CUDA GPU: without one it says so
and exits with status 2.

    python -m bench.fp8_gemm [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable, Optional, Tuple

import torch

from kernels import ops

# (name, N, K) at M = 4096: v3_671b's FP8 linears (model/fp8.py) and its dense SwiGLU.
M_TOKENS = 4096
DENSE = [("q_a_proj", 1536, 7168), ("q_b_proj", 24576, 1536), ("kv_a_proj_with_mqa", 576, 7168),
         ("kv_b_proj", 32768, 512), ("o_proj", 7168, 16384), ("dense gate+up", 36864, 7168),
         ("dense down", 7168, 18432)]
# (experts per rank, rows per expert); experts' (name, N, K): gate+up [2 x 2048, 7168], down [7168, 2048].
GROUPED = [(8, 4096), (16, 2048), (32, 1024)]
EXPERT_GEMMS = [("expert gate+up", 4096, 7168), ("expert down", 7168, 2048)]


def _timer(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of fn() on the GPU over iters runs after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _row(case: str, ours: float, peer: str, peer_value: float) -> None:
    print(json.dumps({"bench": "fp8_gemm", "case": case, "unit": "TFLOP/s", "ours": round(ours, 2), "peer": peer,
                      "peer_value": round(peer_value, 2), "ratio": round(ours / peer_value, 4)}), flush=True)


def _torch_fp8(x: torch.Tensor, w: torch.Tensor, xq, wq) -> Tuple[Optional[Callable[[], object]], str]:
    """torch._scaled_mm with blockwise scales if this torch takes them, else rowwise, else (None, why)."""
    xs_outer = xq[1].t().contiguous().t()
    blockwise = lambda: torch._scaled_mm(xq[0], wq[0].t(), xs_outer, wq[1].t(), out_dtype=torch.bfloat16)  # noqa: E731
    try:
        blockwise()
        return blockwise, "torch._scaled_mm fp8 blockwise 1x128 x 128x128"
    except (RuntimeError, ValueError):
        pass
    sx = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-4) / 448.0
    sw = w.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-4) / 448.0
    xr, wr = (x / sx).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
    rowwise = lambda: torch._scaled_mm(xr, wr.t(), sx, sw.t(), out_dtype=torch.bfloat16)  # noqa: E731
    try:
        rowwise()
        return rowwise, "torch._scaled_mm fp8 rowwise (no blockwise scaling in this torch)"
    except (RuntimeError, ValueError) as err:
        return None, str(err).splitlines()[0]


def dense(iters: int, tag: str) -> None:
    for name, N, K in DENSE:
        x = torch.randn(M_TOKENS, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, wq = ops.quantize_1x128(x), ops.quantize_128x128(w)
        flop = 2 * M_TOKENS * N * K
        ours = flop / _timer(lambda: ops.fp8_gemm(*xq, *wq), iters) / 1e12
        case = f"{name} M={M_TOKENS} N={N} K={K}, {tag}"
        _row(case, ours, "torch bf16 matmul", flop / _timer(lambda: x @ w.t(), iters) / 1e12)
        fn, peer = _torch_fp8(x, w, xq, wq)
        if fn is None:
            print(f"fp8_gemm: torch._scaled_mm unavailable here ({peer})", file=sys.stderr)
            continue
        _row(case, ours, peer, flop / _timer(fn, iters) / 1e12)


def grouped(iters: int, tag: str) -> None:
    for E, rows in GROUPED:
        for name, N, K in EXPERT_GEMMS:
            counts = torch.full((E,), rows, dtype=torch.long, device="cuda")
            x = torch.randn(E * rows, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            xq, wq = ops.quantize_1x128(x), ops.quantize_128x128(w)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            flop = 2 * E * rows * N * K
            ours = flop / _timer(lambda: ops.fp8_gemm_grouped_m(*xq, *wq, counts), iters) / 1e12
            wt = w.transpose(1, 2)
            peer = flop / _timer(lambda: torch._grouped_mm(x, wt, offs=offs), iters) / 1e12
            _row(f"{name} E={E} rows/expert={rows} N={N} K={K}, {tag}", ours, "torch._grouped_mm bf16", peer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.fp8_gemm: needs a CUDA GPU (the Triton FP8 kernels run there); none is visible here",
              file=sys.stderr)
        return 2
    ops.set_backend("triton", torch.device("cuda"))
    tag = f"{torch.cuda.get_device_name()}, Triton kernels"
    dense(args.iters, tag)
    grouped(args.iters, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
