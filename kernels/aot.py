"""Ahead-of-time compilation of recorded Triton launches for a GPU architecture, without a GPU.

Checks what the FP8 kernels (DeepSeek-V3 section 3.3) compile to on Hopper (sm_90) and Blackwell
(sm_100): `compile_launch` gives a recorded launch the specialization Triton's JIT gives it at run
time (its own binder: 16-divisible pointers and integers carry `tt.divisibility` 16, integers equal
to 1 become constants), compiles it with `triton.compile`, and reads from the result the registers,
stack (spills) and static shared memory of the cubin (`cuobjdump --dump-resource-usage`, shipped
in the Triton wheel), the dynamic shared memory, the tensor-core instruction in the PTX (`wgmma`
on sm_90, `tcgen05.mma` on sm_100), whether operand loads are pipelined (asynchronous copies or
TMA loads in the TTGIR), fp32 fused multiply-adds in the PTX, and the resulting occupancy. Import the kernels without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Tuple

TENSOR_CORE_PTX = {90: "wgmma.mma_async", 100: "tcgen05.mma"}
PIPELINED_TTGIR = ("async_copy_global_to_local", "async_tma_copy_global_to_local", "tt.descriptor_load")
# Per-SM limits shared by sm_90 and sm_100: registers, shared memory (bytes), warps, CTAs.
SM_REGISTERS, SM_SHARED, SM_WARPS, SM_CTAS = 65536, 233472, 64, 32
CTA_RESERVED_SHARED = 1024


@dataclass
class Compiled:
    """Resource use and code properties of one kernel specialization on one architecture."""

    arch: int
    registers: int
    stack: int
    shared: int
    num_warps: int
    tensor_core: bool
    pipelined: bool
    fma: bool = False

    @property
    def occupancy(self) -> int:
        """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory and warps."""
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = (SM_REGISTERS // per_warp) // self.num_warps if per_warp else SM_CTAS
        by_smem = SM_SHARED // (self.shared + CTA_RESERVED_SHARED)
        return min(by_regs, by_smem, SM_WARPS // self.num_warps, SM_CTAS)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) function in a cubin, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


_cache: Dict[Tuple, Compiled] = {}


def specialize(kernel, args: tuple, meta: dict, arch: int):
    """(ASTSource, target, options) the JIT would build for kernel(*args, **meta) on sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(meta, debug=False)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def compile_launch(kernel, args: tuple, meta: dict, arch: int) -> Compiled:
    """Compile kernel(*args, **meta) for sm_<arch> as the JIT would and report what it compiled to."""
    import triton
    src, target, options = specialize(kernel, args, meta, arch)
    key = (kernel.cache_key, repr(sorted(src.signature.items())), repr(sorted(src.constants.items())),
           repr(sorted(src.attrs.items())), repr(options), arch)
    if key not in _cache:
        compiled = triton.compile(src, target=target, options=options.__dict__)
        usage = resource_usage(compiled.asm["cubin"])
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        _cache[key] = Compiled(arch=arch, registers=usage["REG"], stack=usage["STACK"] + usage["LOCAL"],
                               shared=compiled.metadata.shared + usage["SHARED"], num_warps=options.num_warps,
                               tensor_core=TENSOR_CORE_PTX[arch] in ptx,
                               pipelined=any(p in ttgir for p in PIPELINED_TTGIR), fma="fma.rn.f32" in ptx)
    return _cache[key]
