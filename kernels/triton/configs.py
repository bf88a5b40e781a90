"""Launch configurations of the FP8 GEMM kernels (DeepSeek-V3 section 3.3), recorded here so that every
run (GPU, CPU interpreter tests, deterministic runs) uses the same ones.

A GEMM launch has a kind: "fprop" (a per row, b per 128x128 block: Fprop and Dgrad of a dense layer),
"fprop_grouped" (the same for expert rows grouped by expert), "wgrad" (both operands per row: the
128x1-quantized Wgrad operands, fp32 out) and "wgrad_grouped" (the experts' grouped-K Wgrad). An entry
is (BLOCK_M, BLOCK_N, num_warps, num_stages, GROUP_M); GROUP_M is the launch order of the persistent
tile walk (GROUP_M row tiles share each sweep over the column tiles). `TUNED` holds the configuration
of a (kind, N, K) launch shape, written by `python -m kernels.autotune --write` on a GPU; other shapes
use `DEFAULTS`, chosen without a GPU as the fastest shapes that `python -m kernels.inspect` shows
compiling for sm_90 and sm_100 without spills, with wgmma / tcgen05 and pipelined loads (the Wgrad
kernels scale the accumulator by a per-column vector as well, which at 128x128 tiles pushes them past
255 registers, hence 128x64 tiles with 4 stages). `CANDIDATES` are the configurations the autotuner
times; every one of them must compile without spills (`python -m kernels.inspect --candidates`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, NamedTuple, Tuple


class GemmConfig(NamedTuple):
    """Tile shape, schedule and launch order of one GEMM launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int


KINDS = ("fprop", "fprop_grouped", "wgrad", "wgrad_grouped")

DEFAULTS: Dict[str, GemmConfig] = {
    "fprop": GemmConfig(128, 128, 8, 3, 8),
    "fprop_grouped": GemmConfig(128, 128, 8, 3, 1),
    "wgrad": GemmConfig(128, 64, 8, 4, 8),
    "wgrad_grouped": GemmConfig(128, 64, 8, 4, 8),
}

CANDIDATES: Dict[str, Tuple[GemmConfig, ...]] = {
    "fprop": (GemmConfig(128, 128, 8, 3, 8), GemmConfig(128, 128, 8, 4, 8), GemmConfig(64, 128, 8, 4, 8),
              GemmConfig(128, 64, 4, 3, 8)),
    "fprop_grouped": (GemmConfig(128, 128, 8, 3, 1), GemmConfig(128, 128, 8, 3, 8), GemmConfig(64, 128, 8, 4, 1),
                      GemmConfig(64, 128, 8, 4, 8)),
    "wgrad": (GemmConfig(128, 64, 8, 4, 8), GemmConfig(128, 64, 8, 3, 8), GemmConfig(64, 64, 4, 4, 8)),
    "wgrad_grouped": (GemmConfig(128, 64, 8, 4, 8), GemmConfig(128, 64, 8, 3, 1), GemmConfig(64, 64, 4, 4, 8)),
}

# BEGIN TUNED (written by `python -m kernels.autotune --write`)
TUNED: Dict[Tuple[str, int, int], GemmConfig] = {
}
# END TUNED

_forced: Dict[str, GemmConfig] = {}


def gemm_config(kind: str, n: int, k: int) -> GemmConfig:
    """The configuration of a `kind` GEMM launch whose b operand is [N, K] (per expert): forced, tuned or default."""
    if kind not in KINDS:
        raise ValueError(f"GEMM kind must be one of {KINDS}, got {kind!r}")
    return _forced.get(kind) or TUNED.get((kind, n, k)) or DEFAULTS[kind]


@contextlib.contextmanager
def forced(configs: Dict[str, GemmConfig]) -> Iterator[None]:
    """Within the block, launches of the given kinds use these configurations (the autotuner's candidates)."""
    bad = set(configs) - set(KINDS)
    if bad:
        raise ValueError(f"GEMM kinds must be among {KINDS}, got {sorted(bad)}")
    previous = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)
