"""Search the layouts of a GPU count that fit a GPU's memory, best first (`python -m parallel.summary --fit`).

DeepSeek-V3 section 3.2 chose its layout (16-way DualPipe PP x 64-way EP x ZeRO-1 DP on 2048 H800s)
for memory, pipeline bubble and communication. `fit_layouts` tries every pp (dividing the GPU count
and leaving every stage a layer), ep (dividing the GPU count / pp and the routed experts), the
dp this leaves, every schedule (pp > 1), micro-batch size (1, 2, 4) and `optim.offload` (none, or
cpu with fp32 moments, as DeepSpeed's CPU Adam needs), always with ZeRO-1, with
the other settings (precision, parameter dtype, sequence length, global batch) of the base layout.
A layout fits when parallel/memory.py's estimate is at most the GPU memory minus a margin for what
the estimate leaves out (CUDA context, communication buffers, fragmentation).

Ranking, best first: the pipeline bubble fraction (idle time of the unit-cost simulation of the
schedule's own action lists, parallel/pipeline_schedules.py, at the step's micro-batch count),
rounded to 1%, then the bytes each GPU sends per step:
- expert parallelism: per MoE layer and token, dispatch of k copies (FP8 with scales under fp8,
  else bf16) and combine (bf16), forward and backward, the (ep - 1) / ep that leave the rank;
- pipeline: the bf16 hidden state, forward and backward, per stage boundary the rank sends across;
- ZeRO-1: reduce-scatter of the fp32 gradients and all-gather of the parameters,
  (N - 1) / N of each over the N ranks sharing them (dense: dp x ep, experts: dp);
- offload: the shard's fp32 gradient to the host and its fp32 master weight back.
"""
from __future__ import annotations

import dataclasses
import itertools
from functools import lru_cache
from typing import Dict, List, Optional

from model.config import ModelConfig
from model.memory import PARAM_DTYPES

from .memory import OFFLOADS, Layout, holds_stage, memory_per_gpu, pipeline_stages, rank_param_counts
from .pipeline_schedules import SCHEDULE_CLASSES, schedule_actions, simulate
from .pipeline_stages import DEFAULT_STAGES_PER_RANK

MICRO_BATCHES = (1, 2, 4)
DEFAULT_GLOBAL_BATCH_TOKENS = 15360 * 4096
"""Sequences per step when train.global_batch is not given: DeepSeek-V3's 15360 x 4096 tokens."""


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def bubble_fraction(layout: Layout, n_microbatches: int) -> float:
    """Idle fraction of a pipeline step: the idle time of the simulated schedule (which stops
    growing once every rank reaches its steady state) over idle + busy time at `n_microbatches`."""
    if layout.pp == 1:
        return 0.0
    n_sim = min(n_microbatches, 2 * layout.n_stages)
    sim = _simulated(layout.schedule, layout.pp, layout.stages_per_rank, n_sim, layout.n_stages)
    busy = sim["busy_per_rank"] * n_microbatches / n_sim
    return sim["bubble_per_rank"] / (sim["bubble_per_rank"] + busy)


@lru_cache(maxsize=None)
def _simulated(schedule: str, pp: int, stages_per_rank: Optional[int], n: int, n_stages: int) -> Dict[str, float]:
    return simulate(schedule_actions(schedule, pp, n, stages_per_rank), n_stages)


def comm_bytes_per_gpu(cfg: ModelConfig, layout: Layout, n_microbatches: int) -> float:
    """Bytes one GPU of the peak-memory pipeline rank sends per step (module docstring)."""
    D = cfg.hidden_size
    tokens = n_microbatches * layout.micro_batch * layout.seq_len
    rank = memory_per_gpu(cfg, layout)["layout"]["peak_pp_rank"]
    stages = pipeline_stages(cfg, layout)[rank]
    moe_layers = sum(cfg.is_moe_layer(i) for stage in stages for i in stage)
    if holds_stage(layout, rank)["last"]:
        moe_layers += sum(cfg.is_moe_layer(cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
    wire = 1 + 4 / 128 if layout.precision == "fp8" else 2
    ep = 2 * moe_layers * tokens * cfg.num_experts_per_tok * D * (wire + 2) * (layout.ep - 1) / layout.ep
    boundaries = len(stages) if layout.pp > 1 else 0
    pp = 2 * boundaries * tokens * D * 2
    counts = rank_param_counts(cfg, layout)[rank]
    per_param = 4 + PARAM_DTYPES[layout.param_dtype]  # fp32 gradients out, parameters back
    dense_n, expert_n = layout.dp * layout.ep, layout.dp
    zero = (counts["dense"] * per_param * (dense_n - 1) / dense_n
            + counts["experts"] * per_param * (expert_n - 1) / expert_n)
    host = 0.0
    if layout.offload == "cpu":  # the shard's fp32 gradient to the host, its fp32 master back
        host = (counts["dense"] / dense_n + counts["experts"] / expert_n) * 8
    return ep + pp + zero + host


def fit_layouts(cfg: ModelConfig, base: Layout, gpus: int, gpu_mem_gib: float, margin_gib: float) -> List[Dict]:
    """Every layout of `gpus` GPUs that fits, best first (module docstring): [{"layout": {...},
    "memory_gib_per_gpu", "bubble_fraction", "comm_gib_per_gpu_per_step", "host_memory_gib_per_gpu",
    with offload "offload": {gpu_gib_saved, host_gib_per_node}}]."""
    if gpus < 1 or gpu_mem_gib <= 0:
        raise ValueError(f"--fit needs a positive GPU count and --gpu-mem, got {gpus} and {gpu_mem_gib}")
    seqs = base.global_batch or max(1, DEFAULT_GLOBAL_BATCH_TOKENS // base.seq_len)
    rows = []
    for pp in _divisors(gpus):
        for ep in (e for e in _divisors(gpus // pp) if cfg.n_routed_experts % e == 0 or cfg.n_routed_experts == 0):
            dp = gpus // (pp * ep)
            for schedule in (SCHEDULE_CLASSES if pp > 1 else ("1f1b",)):
                for micro, offload in itertools.product(MICRO_BATCHES, OFFLOADS):
                    if seqs % (dp * ep * micro):
                        continue
                    moments = "fp32" if offload == "cpu" else base.moments_dtype  # DeepSpeed's CPU Adam
                    layout = dataclasses.replace(base, pp=pp, ep=ep, dp=dp, schedule=schedule, micro_batch=micro,
                                                 stages_per_rank=None if pp == 1 else DEFAULT_STAGES_PER_RANK[schedule],
                                                 layers_per_stage=None, zero=True, global_batch=seqs, offload=offload,
                                                 moments_dtype=moments)
                    try:
                        memory = memory_per_gpu(cfg, layout)
                    except ValueError:
                        continue
                    if memory["memory_gib_per_gpu"] > gpu_mem_gib - margin_gib:
                        continue
                    n = layout.n_microbatches()
                    rows.append({"layout": memory["layout"], "memory_gib_per_gpu": memory["memory_gib_per_gpu"],
                                 "bubble_fraction": bubble_fraction(layout, n),
                                 "comm_gib_per_gpu_per_step": comm_bytes_per_gpu(cfg, layout, n) / 2 ** 30,
                                 **{k: memory[k] for k in ("host_memory_gib_per_gpu", "offload") if k in memory}})
    rows.sort(key=lambda r: (round(r["bubble_fraction"], 2), r["comm_gib_per_gpu_per_step"]))
    return rows
