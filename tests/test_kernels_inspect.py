"""`python -m kernels.inspect` (issue: FP8 kernels checked by compiling them for sm_90 and sm_100 without a GPU).

One run compiles every Triton launch of the FP8 training path at tiny shapes (100 tokens: no dimension a
multiple of 128) and at the v3_671b shapes for Hopper and Blackwell, and must find no spill, and the
tensor-core instruction and pipelined operand loads in every GEMM. TRITON_INTERPRET is removed from the
environment: the interpreter's kernels cannot be compiled.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_kernels_compile_without_spills_with_tensor_cores_and_pipelined_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "kernels.inspect", "--arch", "90,100", "--model", "tiny,v3_671b",
                           "--tokens", "100,4096", "--experts-per-rank", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert "# tiny, 100 tokens" in out and "# v3_671b, 4096 tokens" in out, proc.stderr[-3000:]
    for kernel in ("_gemm_kernel", "_gemm_grouped_k_kernel", "_quant_1x128_kernel", "_quant_128x128_kernel",
                   "_quant_128x1_kernel", "_swiglu_quant_kernel"):
        for arch in (90, 100):
            assert re.search(rf"^\| {kernel} \| [^|]+ \| {arch} \|", out, re.M), f"{kernel} not compiled for sm_{arch}"
    bad = [line for line in out.splitlines() if line.startswith("| _") and not line.endswith("| ok |")]
    assert proc.returncode == 0 and not bad, "\n".join(bad) + proc.stderr[-2000:]


def test_autotuning_candidates_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "kernels.inspect", "--arch", "90,100", "--model", "tiny",
                           "--tokens", "100", "--candidates"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    from kernels.triton.configs import CANDIDATES, DEFAULTS
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _")]
    for kind, candidates in CANDIDATES.items():
        tried = sum(c != DEFAULTS[kind] for c in candidates)
        assert sum(f"| {kind} candidate: " in row for row in rows) == 2 * tried, f"{kind}: candidates missing"
    bad = [row for row in rows if not row.endswith("| ok |")]
    assert proc.returncode == 0 and not bad, "\n".join(bad) + proc.stderr[-2000:]
