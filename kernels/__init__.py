"""Numerics with a fast path: FP8 quantization, blockwise GEMMs and the FP8 Linear / expert autograd.

`kernels.fp8` is the plain-PyTorch reference, `kernels.triton` the Triton kernels, `kernels.ops`
picks one per call (Triton for CUDA tensors), `kernels.linear` the autograd functions built on them.
This package imports nothing from the rest of the project.
"""
