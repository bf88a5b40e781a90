"""Triton kernels for FP8 quantization and blockwise GEMMs; same signatures and numerics as `kernels.fp8`.

Run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this package was imported.
"""
from .gemm import fp8_gemm, fp8_gemm_grouped_k, fp8_gemm_grouped_m
from .quant import quantize_128x1, quantize_128x128, quantize_1x128
from .swiglu import swiglu_quantize_1x128

__all__ = ["fp8_gemm", "fp8_gemm_grouped_k", "fp8_gemm_grouped_m", "quantize_128x1", "quantize_128x128",
           "quantize_1x128", "swiglu_quantize_1x128"]
