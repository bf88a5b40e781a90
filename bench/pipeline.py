"""Pipeline bubbles of the four schedules, from the schedules' own action lists, next to the
DualPipe paper's formulas.

DeepSeek-V3 section 3.2.1 (table 2) and the DualPipe repository compare pipeline bubbles:
1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe / DualPipeV (PP/2-1)(F&B+B-3W) with PP the number
of pipeline stages. `python -m bench.pipeline` builds each torch.distributed.pipelining schedule for
`--pp` ranks and `--microbatches` micro-batches without a process group
(`parallel.pipeline_schedules.schedule_actions`), runs its per-rank action lists through a
unit-time simulation and prints one JSON line per schedule:
{"bench": "pipeline", "case", "unit": "bubble fraction", "ours", "peer", "peer_value", "ratio"}.

Time model (stated, not measured): per stage chunk F = I = W = 1 (forward, backward for inputs,
backward for weights), full backward B = I + W = 2, an overlapped forward+backward pair
F&B = F + B = 3 (on one device the overlap hides communication, not compute), zero communication
latency. Bubble fraction = idle time / (makespan x ranks), which does not depend on the chunk size.
A formula gives the idle time per rank in chunks of its own schedule; its fraction is
bubble / (bubble + n x chunks per rank x (F + B)). 1F1B is compared with the 1F1B formula,
interleaved 1F1B with the same count in chunks of 1/v of a rank's layers (Narayanan et al. 2021),
ZB-V (the zero-bubble schedule torch ships) with ZB1P (one chunk per rank), DualPipeV with
DualPipe's formula and PP = 2 x ranks stages, as the DualPipe repository states for DualPipeV.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

from parallel.pipeline_schedules import count_actions, schedule_actions, simulate
from parallel.pipeline_stages import DEFAULT_STAGES_PER_RANK

F, I, W = 1.0, 1.0, 1.0
B = I + W
FB = F + B


def formula(schedule: str, pp: int) -> Dict[str, object]:
    """The paper's bubble for the formula matching `schedule`: idle time per rank in chunk units of
    the formula's own schedule, and how many chunks per rank that schedule has."""
    if schedule == "1f1b":
        return {"peer": "1F1B formula (PP-1)(F+B)", "bubble": (pp - 1) * (F + B), "chunks": 1}
    if schedule == "interleaved_1f1b":
        v = DEFAULT_STAGES_PER_RANK[schedule]
        return {"peer": f"interleaved 1F1B (PP-1)(F+B) in chunks of 1/{v} rank", "bubble": (pp - 1) * (F + B),
                "chunks": v}
    if schedule == "zbv":
        return {"peer": "ZB1P formula (PP-1)(F+B-2W)", "bubble": (pp - 1) * (F + B - 2 * W), "chunks": 1}
    stages = 2 * pp
    return {"peer": "DualPipe formula (PP/2-1)(F&B+B-3W), PP=2x ranks", "bubble": (stages / 2 - 1) * (FB + B - 3 * W),
            "chunks": 2}


def bench(pp: int, microbatches: int) -> List[Dict[str, object]]:
    rows = []
    for schedule, spr in DEFAULT_STAGES_PER_RANK.items():
        actions = schedule_actions(schedule, pp, microbatches)
        sim = simulate(actions, pp * spr)
        ref = formula(schedule, pp)
        peer_fraction = ref["bubble"] / (ref["bubble"] + microbatches * ref["chunks"] * (F + B))
        rows.append({
            "bench": "pipeline",
            "case": f"{schedule} pp={pp} microbatches={microbatches} stages/rank={spr}: bubble fraction "
                    f"(idle per rank {sim['bubble_per_rank']:g} chunks, formula {ref['bubble']:g} of its "
                    f"{ref['chunks']}-per-rank chunks; actions {count_actions(actions)})",
            "unit": "bubble fraction",
            "ours": round(sim["bubble_fraction"], 6),
            "peer": ref["peer"],
            "peer_value": round(peer_fraction, 6),
            "ratio": round(sim["bubble_fraction"] / peer_fraction, 6) if peer_fraction else None,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args()
    for row in bench(args.pp, args.microbatches):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
