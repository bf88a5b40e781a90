"""Pipeline schedules: `parallel.schedule` -> a torch.distributed.pipelining schedule, its limits,
and its per-rank action lists with a unit-time simulation of them (the bubble of a schedule).

Schedules: 1F1B (Narayanan et al. 2021), interleaved 1F1B (same paper, several looped stages per
rank), ZB-V (zero bubble, V shape; Qi et al. 2024, section 6) and DualPipeV (DeepSeek-V3 section
3.2.1's DualPipe, cut in half to one V of 2 stages per rank). All are torch's own implementations;
this module only maps names, checks the combinations up front with errors that name the settings,
and reads the action tables the schedule objects build.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence
from unittest import mock

from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                          ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, schedules)
from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, _Action

SCHEDULE_CLASSES = {
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


def check_microbatches(schedule: str, pp: int, stages_per_rank: int, n_microbatches: int) -> None:
    """Raise ValueError when `schedule` cannot run `n_microbatches` micro-batches on `pp` ranks.

    The micro-batch count is train.global_batch / (data-parallel ranks x train.micro_batch).
    """
    n_stages = pp * stages_per_rank
    where = (f"(parallel.schedule={schedule}, parallel.pp={pp}; micro-batches per step = train.global_batch / "
             f"(dp x ep x train.micro_batch) = {n_microbatches})")
    if n_microbatches < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch {where}")
    if schedule == "1f1b" and n_microbatches < pp:
        raise ValueError(f"1F1B needs at least parallel.pp = {pp} micro-batches per step {where}")
    if schedule == "dualpipev" and n_microbatches < n_stages:
        raise ValueError(f"DualPipeV needs at least as many micro-batches as stages (2 x parallel.pp = "
                         f"{n_stages}) {where}")
    if schedule == "interleaved_1f1b":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ValueError(f"interleaved 1F1B runs micro-batches in rounds of parallel.pp; the count must be a "
                             f"multiple of max(1, n // pp) = {rounds} {where}")


def schedule_actions(schedule: str, pp: int, n_microbatches: int,
                     stages_per_rank: Optional[int] = None) -> List[List[_Action]]:
    """The compute actions of every rank, in execution order, taken from the schedule objects.

    Built without a process group: the schedule gets stand-in stage objects. The multi-stage
    schedules execute their `pipeline_order` table, which is returned as is (idle slots and
    gradient-reduction bookkeeping dropped). `Schedule1F1B`'s table is only a drawing aid and
    mislabels the last rank's micro-batches (it starts at 1), so for 1F1B the order is recorded by
    running the schedule's own `_step_microbatches` against the stand-in stage with communication
    stubbed out.
    """
    from .pipeline_stages import check_schedule

    spr = check_schedule(schedule, pp, stages_per_rank)
    check_microbatches(schedule, pp, spr, n_microbatches)
    if schedule == "1f1b":
        return [_executed_single_stage_order(Schedule1F1B, rank, pp, n_microbatches) for rank in range(pp)]
    stages = [_stand_in_stage(0, pp, pp * spr) for _ in range(spr)]
    order = SCHEDULE_CLASSES[schedule](stages, n_microbatches).pipeline_order
    compute = {"F", "B", "I", "W", "OVERLAP_F_B"}
    return [[a for a in order[r] if a is not None and a.computation_type.value in compute] for r in range(pp)]


def _stand_in_stage(rank: int, pp: int, n_stages: int):
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.num_stages, stage.submod = rank, pp, n_stages, None
    stage.stage_index, stage.is_first, stage.is_last = rank, rank == 0, rank == n_stages - 1
    return stage


def _executed_single_stage_order(cls, rank: int, pp: int, n_microbatches: int) -> List[_Action]:
    stage = _stand_in_stage(rank, pp, pp)
    log: List[_Action] = []
    stage.forward_one_chunk.side_effect = lambda mb, *a, **k: log.append(_Action(rank, FORWARD, mb))
    stage.backward_one_chunk.side_effect = lambda mb, *a, **k: log.append(_Action(rank, FULL_BACKWARD, mb))
    sched = cls(stage, n_microbatches)
    with mock.patch.object(schedules, "_batch_p2p", return_value=[]), \
            mock.patch.object(schedules, "_wait_batch_p2p"), mock.patch.object(sched, "_initialize_stage"):
        sched._step_microbatches([()] * n_microbatches, [{}] * n_microbatches)
    return log


UNIT_COSTS = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}


def _leaves(action: _Action) -> Sequence[_Action]:
    return action.sub_actions if action.sub_actions else (action,)


def simulate(actions: List[List[_Action]], n_stages: int,
             costs: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Run the action lists with per-action costs and zero-latency communication.

    Each rank executes its list in order; an action starts when its rank is free and its inputs are
    ready: F(s, m) after F(s-1, m); the backward of (s, m) (B = full, or I = input part) after F(s, m)
    and the backward of (s+1, m); W(s, m) after I(s, m). An overlapped F&B action runs its two parts
    back to back. Returns the makespan, busy time per rank and the bubble (idle) time and fraction.
    """
    costs = dict(UNIT_COSTS, **(costs or {}))
    done: Dict[tuple, float] = {}
    queues = [[leaf for a in rank_ops for leaf in _leaves(a)] for rank_ops in actions]
    pos, free = [0] * len(queues), [0.0] * len(queues)
    busy = [sum(costs[a.computation_type.value] for a in q) for q in queues]

    def deps(a: _Action) -> List[tuple]:
        s, m, kind = a.stage_index, a.microbatch_index, a.computation_type.value
        if kind == "F":
            return [("F", s - 1, m)] if s > 0 else []
        if kind in ("B", "I"):
            return [("F", s, m)] + ([("bwd", s + 1, m)] if s < n_stages - 1 else [])
        if kind == "W":
            return [("bwd", s, m)]
        raise ValueError(f"unexpected pipeline action {a}")

    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r, q in enumerate(queues):
            while pos[r] < len(q):
                a = q[pos[r]]
                need = deps(a)
                if any(d not in done for d in need):
                    break
                start = max([free[r]] + [done[d] for d in need])
                free[r] = start + costs[a.computation_type.value]
                kind = a.computation_type.value
                key = ("bwd" if kind in ("B", "I") else kind, a.stage_index, a.microbatch_index)
                done[key] = free[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [str(q[pos[r]]) for r, q in enumerate(queues) if pos[r] < len(q)]
            raise RuntimeError(f"pipeline action lists deadlock at {stuck}")
    makespan = max(free)
    idle = [makespan - b for b in busy]
    return {"makespan": makespan, "busy_per_rank": sum(busy) / len(busy),
            "bubble_per_rank": sum(idle) / len(idle), "bubble_fraction": sum(idle) / (makespan * len(idle))}


def count_actions(actions: List[List[_Action]]) -> Dict[str, int]:
    """How many actions of each kind (F, B, I, W) all ranks run together (overlaps split)."""
    out: Dict[str, int] = {}
    for rank_ops in actions:
        for a in rank_ops:
            for leaf in _leaves(a):
                kind = leaf.computation_type.value
                out[kind] = out.get(kind, 0) + 1
    return out

