"""Blockwise-scaled FP8 GEMM throughput (DeepSeek-V3 section 3.3) against torch's bf16 and FP8 GEMMs.

TFLOP/s (2·M·N·K per GEMM) of `kernels.ops.fp8_gemm` (operands already quantized: 1x128 activation
tiles, 128x128 weight blocks, promotion every 128 of K) and of the M-grouped expert GEMM, against
torch's bf16 matmul (`torch._grouped_mm` for experts) and `torch._scaled_mm` with rowwise scales.

On CUDA: DeepSeek-V3 shapes, Triton kernels. Without CUDA the figures are for the PyTorch reference
at reduced shapes (the case says device=cpu); they say nothing about GPU speed, which needs CUDA.

    python -m bench.fp8_gemm [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

from kernels import ops

# (M, N, K): tokens x output x input. 7168 = hidden, 16384 = 128 heads x v_head 128 (o_proj),
# 2112 = q_lora 1536 + kv_lora 512 + rope 64 (fused down-projections), 24576 = q_b_proj, 18432 = dense MLP.
DENSE_CUDA = [(4096, 7168, 16384), (4096, 2112, 7168), (4096, 24576, 1536), (4096, 7168, 18432)]
# (experts, rows per expert, N, K): gate_up (2 x 2048, 7168) and down (7168, 2048) of 8 local experts.
GROUPED_CUDA = [(8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
DENSE_CPU = [(512, 1024, 2048), (512, 264, 896)]
GROUPED_CPU = [(4, 256, 512, 896), (4, 256, 896, 256)]


def _timer(device: torch.device, fn: Callable[[], object], iters: int) -> float:
    """Median seconds of fn() over iters runs after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rowwise_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-4) / 448.0
    return (x / scale).to(torch.float8_e4m3fn), scale


def _row(case: str, ours: float, peer: str, peer_value: float) -> None:
    print(json.dumps({"bench": "fp8_gemm", "case": case, "unit": "TFLOP/s", "ours": round(ours, 4), "peer": peer,
                      "peer_value": round(peer_value, 4), "ratio": round(ours / peer_value, 4)}), flush=True)


def dense(device: torch.device, shapes: List[Tuple[int, int, int]], iters: int, tag: str) -> None:
    for M, N, K in shapes:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        xq, wq = ops.quantize_1x128(x), ops.quantize_128x128(w)
        flop = 2 * M * N * K
        ours = flop / _timer(device, lambda: ops.fp8_gemm(*xq, *wq), iters) / 1e12
        bf16 = flop / _timer(device, lambda: x @ w.t(), iters) / 1e12
        case = f"dense M={M} N={N} K={K}, {tag}"
        _row(case, ours, "torch bf16 matmul", bf16)
        (xr, sx), (wr, sw) = _rowwise_fp8(x), _rowwise_fp8(w)
        try:
            scaled = flop / _timer(device, lambda: torch._scaled_mm(xr, wr.t(), sx, sw.t(), out_dtype=torch.bfloat16),
                                   iters) / 1e12
        except RuntimeError as err:
            print(f"fp8_gemm: torch._scaled_mm rowwise unavailable here ({str(err).splitlines()[0]})", file=sys.stderr)
            continue
        _row(case, ours, "torch._scaled_mm fp8 rowwise", scaled)


def grouped(device: torch.device, shapes: List[Tuple[int, int, int, int]], iters: int, tag: str) -> None:
    for E, rows, N, K in shapes:
        counts = [rows] * E
        x = torch.randn(E * rows, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=device, dtype=torch.bfloat16) * 0.02
        xq, wq = ops.quantize_1x128(x), ops.quantize_128x128(w)
        offs = torch.cumsum(torch.tensor(counts, device=device), 0).to(torch.int32)
        flop = 2 * E * rows * N * K
        ours = flop / _timer(device, lambda: ops.fp8_gemm_grouped_m(*xq, *wq, counts), iters) / 1e12
        wt = w.transpose(1, 2)
        try:
            peer = flop / _timer(device, lambda: torch._grouped_mm(x, wt, offs=offs), iters) / 1e12
            name = "torch._grouped_mm bf16"
        except RuntimeError:
            peer = flop / _timer(device, lambda: [x[i * rows:(i + 1) * rows] @ w[i].t() for i in range(E)], iters) / 1e12
            name = "torch bf16 matmul per expert"
        _row(f"grouped E={E} rows/expert={rows} N={N} K={K}, {tag}", ours, name, peer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and ops.triton_available():
        device, tag = torch.device("cuda"), f"device=cuda ({torch.cuda.get_device_name()}), Triton kernels"
        dense(device, DENSE_CUDA, args.iters, tag)
        grouped(device, GROUPED_CUDA, args.iters, tag)
        return
    print("fp8_gemm: no CUDA device: measuring the PyTorch reference at reduced shapes on the CPU; "
          "GPU figures (Triton kernels, DeepSeek-V3 shapes) need CUDA", file=sys.stderr)
    torch.set_num_threads(2)
    tag = "device=cpu, PyTorch reference (not the GPU kernels)"
    dense(torch.device("cpu"), DENSE_CPU, max(3, args.iters // 4), tag)
    grouped(torch.device("cpu"), GROUPED_CPU, max(3, args.iters // 4), tag)


if __name__ == "__main__":
    main()
