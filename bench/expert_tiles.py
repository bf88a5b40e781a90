"""Tiles of the experts' FP8 Fprop/Dgrad GEMMs: the persistent walk against the padded grid (DeepSeek-V3 section 3.3).

The M-grouped expert GEMM (`kernels.triton.gemm`) used to launch one program per tile of a grid
sized on the host by the bound `kernels.groups.blocks_bound(M, E, BLOCK_M)` (any counts summing to M
fit), the tiles past the real ones exiting at once. The persistent kernel launches one program per SM
(132 on an H100 SXM) and walks only the real tiles, sum over experts of ceil(rows / BLOCK_M), a count
it reads on the device. Counted here, no GPU needed, for v3_671b's experts on one expert-parallel rank
(8 of 256 experts, 4096 tokens x top-8 from each of 32 ranks: 32768 rows when balanced, as in
`bench.fp8_gemm`; and 1024 rows, one rank's own 4096 tokens) under balanced and skewed routings, with
the configured tile (`kernels.triton.configs`). Also the rows the tiles cover against the real rows.

    python -m bench.expert_tiles
"""
from __future__ import annotations

import json
from typing import Dict, List

import torch

from kernels.fp8 import cdiv
from kernels.groups import block_offsets, blocks_bound
from kernels.triton.configs import gemm_config

H100_SMS = 132
EXPERT_GEMMS = [("gate+up", 4096, 7168), ("down", 7168, 2048)]


def skewed(rows: int, experts: int, empty: int = 0) -> List[int]:
    """Counts ∝ 1/(e+1) over the first experts - empty experts, the last `empty` experts without rows."""
    live = experts - empty
    weights = [1.0 / (e + 1) for e in range(live)]
    counts = [int(rows * w / sum(weights)) for w in weights]
    counts[0] += rows - sum(counts)
    return counts + [0] * empty


def tile_counts(counts: List[int], n: int, k: int, sms: int = H100_SMS) -> Dict[str, int]:
    """Tiles of the padded grid and of the persistent walk, programs launched, rows covered, for one GEMM."""
    cfg = gemm_config("fprop_grouped", n, k)
    n_tiles = cdiv(n, cfg.block_n)
    M, E = sum(counts), len(counts)
    padded = blocks_bound(M, E, cfg.block_m) * n_tiles
    real_m = int(block_offsets(torch.tensor(counts), cfg.block_m)[-1])
    return {"padded_tiles": padded, "walked_tiles": real_m * n_tiles, "programs": min(sms, padded),
            "rows_covered": real_m * cfg.block_m, "rows": M, "block_m": cfg.block_m}


def cases() -> Dict[str, List[int]]:
    """Routings of one rank's 8 experts."""
    return {"balanced, 32768 rows": [4096] * 8, "skewed 1/(e+1), 32768 rows": skewed(32768, 8),
            "skewed, 3 empty experts, 32768 rows": skewed(32768, 8, empty=3),
            "balanced, 1024 rows": [128] * 8, "skewed 1/(e+1), 1024 rows": skewed(1024, 8),
            "skewed, 3 empty experts, 1024 rows": skewed(1024, 8, empty=3)}


def main() -> None:
    for case, counts in cases().items():
        for name, n, k in EXPERT_GEMMS:
            t = tile_counts(counts, n, k)
            label = f"{case}, expert {name} Fprop (N={n}, K={k}, {t['block_m']}-row tiles), counts {counts}"
            print(json.dumps({"bench": "expert_tiles", "case": label, "unit": "tiles computed",
                              "ours": t["walked_tiles"], "peer": "padded grid (programs launched)",
                              "peer_value": t["padded_tiles"], "ratio": round(t["walked_tiles"] / t["padded_tiles"], 4),
                              "programs": t["programs"], "rows_covered": t["rows_covered"], "rows": t["rows"]}))


if __name__ == "__main__":
    main()
