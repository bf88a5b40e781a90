"""`python -m kernels.autotune`: times the FP8 GEMM configurations on a GPU and records the winners.

DeepSeek-V3 section 3.3 (FP8 training): the blockwise-scaled GEMMs' tile shapes, warps, pipeline
stages and launch order (`kernels.triton.configs.CANDIDATES`) are timed per launch shape of a
model's FP8 training path (`launch_shapes`: Fprop, Dgrad and Wgrad of the attention / MTP linears,
of the dense and shared SwiGLUs, and the grouped GEMMs of the routed experts with balanced counts),
each with `triton.testing.do_bench` on random FP8 operands. The fastest configuration of each
(kind, N, K) is printed, and with --write recorded in the `TUNED` table of kernels/triton/configs.py,
which every run (GPU, CPU interpreter tests, deterministic runs) then uses. Without a CUDA GPU it
prints one line saying so and exits with status 2; the recorded table stays as it is. Every
candidate must compile without spills: `python -m kernels.inspect --candidates`.

    python -m kernels.autotune [--model v3_671b] [--tokens 4096] [--experts-per-rank 8] [--write]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

CONFIGS_PY = Path(__file__).resolve().parent / "triton" / "configs.py"
_TABLE = re.compile(r"(# BEGIN TUNED[^\n]*\n)(.*?)(# END TUNED)", re.S)
_ENTRY = re.compile(r"\('(\w+)', (\d+), (\d+)\): GemmConfig\(([\d, ]+)\)")


class Shape(NamedTuple):
    """One GEMM launch shape: its kind, rows (or Wgrad's contraction length) M, N, K, and experts' row counts."""

    kind: str
    m: int
    n: int
    k: int
    counts: Optional[Tuple[int, ...]]


def launch_shapes(cfg: dict, tokens: int, experts_per_rank: int) -> List[Shape]:
    """The distinct (kind, N, K) GEMM launches of one layer of each kind of the model, forward and backward."""
    from .inspect import fp8_modules, routed_counts
    from .linear import ROW_ALIGN
    linears, swiglus = fp8_modules(cfg, experts_per_rank)
    wgrad_m = tokens + (-tokens % ROW_ALIGN)
    gemms = []  # (grouped, m, out, in): Fprop out x in, Dgrad in x out, Wgrad out x in
    for _, k_in, n_out, _ in linears:
        gemms.append((None, tokens, n_out, k_in))
    for name, experts, d, inter in swiglus:
        counts = tuple(routed_counts(cfg, tokens, experts)) if name == "routed_experts" else None
        m = sum(counts) if counts else tokens
        gemms += [(counts, m, 2 * inter, d), (counts, m, d, inter)]
    shapes: Dict[Tuple[str, int, int], Shape] = {}
    for counts, m, n_out, k_in in gemms:
        suffix = "_grouped" if counts else ""
        for kind, mm, n, k in ((f"fprop{suffix}", m, n_out, k_in), (f"fprop{suffix}", m, k_in, n_out),
                               (f"wgrad{suffix}", m if counts else wgrad_m, n_out, k_in)):
            shapes.setdefault((kind, n, k), Shape(kind, mm, n, k, counts))
    return list(shapes.values())


def _fp8(shape, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(torch.float8_e4m3fn)


def _scales(shape, device) -> torch.Tensor:
    return torch.rand(shape, device=device) + 0.5


def gemm_call(shape: Shape, device: torch.device):
    """A no-argument function running the GEMM of `shape` on random FP8 operands (the Triton kernels)."""
    from . import triton as tk
    from .fp8 import BLOCK, cdiv
    from .groups import blocks_bound
    m, n, k, counts = shape.m, shape.n, shape.k, shape.counts
    if shape.kind.startswith("fprop"):
        experts = len(counts) if counts else 1
        a, sa = _fp8((m, k), device), _scales((m, cdiv(k, BLOCK)), device)
        b, sb = _fp8((experts, n, k), device), _scales((experts, cdiv(n, BLOCK), cdiv(k, BLOCK)), device)
        if counts:
            counts_t = torch.tensor(counts, device=device)
            return lambda: tk.fp8_gemm_grouped_m(a, sa, b, sb, counts_t)
        return lambda: tk.fp8_gemm(a, sa, b[0], sb[0])
    cols = BLOCK * blocks_bound(m, len(counts), BLOCK) if counts else m
    a, sa = _fp8((n, cols), device), _scales((n, cdiv(cols, BLOCK)), device)
    b, sb = _fp8((k, cols), device), _scales((k, cdiv(cols, BLOCK)), device)
    if counts:
        counts_t = torch.tensor(counts, device=device)
        return lambda: tk.fp8_gemm_grouped_k(a, sa, b, sb, counts_t)
    return lambda: tk.fp8_gemm(a, sa, b, sb, torch.float32)


def tune(shapes: List[Shape], device: torch.device) -> Dict[Tuple[str, int, int], dict]:
    """Per (kind, N, K): milliseconds of every candidate configuration, the default's and the winner."""
    import triton.testing
    from .triton.configs import CANDIDATES, DEFAULTS, forced
    results = {}
    for shape in shapes:
        call = gemm_call(shape, device)
        times = {}
        for candidate in CANDIDATES[shape.kind]:
            with forced({shape.kind: candidate}):
                times[candidate] = triton.testing.do_bench(call, warmup=10, rep=50)
        best = min(times, key=times.get)
        results[(shape.kind, shape.n, shape.k)] = {"shape": shape, "times": times, "best": best,
                                                   "default_ms": times.get(DEFAULTS[shape.kind])}
    return results


def format_table(table: Dict[Tuple[str, int, int], tuple]) -> str:
    """The body of configs.py's TUNED table for these entries (sorted)."""
    lines = ["TUNED: Dict[Tuple[str, int, int], GemmConfig] = {"]
    for (kind, n, k), c in sorted(table.items()):
        lines.append(f"    ({kind!r}, {n}, {k}): GemmConfig({', '.join(str(int(v)) for v in c)}),")
    return "\n".join(lines + ["}", ""])


def read_table(path: Path = CONFIGS_PY) -> Dict[Tuple[str, int, int], tuple]:
    """The TUNED table recorded in a configs.py file (the lines `format_table` writes)."""
    from .triton.configs import GemmConfig
    match = _TABLE.search(path.read_text())
    if not match:
        raise SystemExit(f"kernels.autotune: {path}: no '# BEGIN TUNED' ... '# END TUNED' block")
    return {(kind, int(n), int(k)): GemmConfig(*(int(v) for v in values.split(",")))
            for kind, n, k, values in _ENTRY.findall(match.group(2))}


def write_table(table: Dict[Tuple[str, int, int], tuple], path: Path = CONFIGS_PY) -> None:
    """Replace the TUNED table of a configs.py file by `table`, leaving the rest of the file as it is."""
    text = path.read_text()
    if not _TABLE.search(text):
        raise SystemExit(f"kernels.autotune: {path}: no '# BEGIN TUNED' ... '# END TUNED' block")
    path.write_text(_TABLE.sub(lambda m: m.group(1) + format_table(table) + m.group(3), text, count=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="v3_671b", help="configs/model/<name>.yaml or a YAML path")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (GEMM M)")
    parser.add_argument("--experts-per-rank", type=int, default=8, help="routed experts per expert-parallel rank")
    parser.add_argument("--write", action="store_true", help="record the winners in kernels/triton/configs.py")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.autotune: no CUDA GPU (or TRITON_INTERPRET=1): nothing timed, "
              "kernels/triton/configs.py's recorded table unchanged")
        return 2
    from .inspect import load_model_config
    device = torch.device("cuda")
    results = tune(launch_shapes(load_model_config(args.model), args.tokens, args.experts_per_rank), device)
    for (kind, n, k), r in results.items():
        print(json.dumps({"kind": kind, "m": r["shape"].m, "n": n, "k": k, "best": list(r["best"]),
                          "best_ms": round(r["times"][r["best"]], 4), "default_ms": r["default_ms"] and
                          round(r["default_ms"], 4), "device": torch.cuda.get_device_name(device)}))
    if args.write:
        table = read_table()
        table.update({key: r["best"] for key, r in results.items()})
        write_table(table)
        print(f"kernels.autotune: {len(results)} entries written to {CONFIGS_PY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
