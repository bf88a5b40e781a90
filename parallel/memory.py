"""Training memory per GPU of a (pp, dp, ep) layout: what each pipeline rank holds at its peak.

DeepSeek-V3 sections 3.2 (16-way DualPipe PP x 64-way EP x ZeRO-1 DP), 3.2.3 (recomputation, low-
precision optimizer state, MTP sharing embedding and head with the main model) and 3.3.
`memory_per_gpu(cfg, Layout(...))` estimates, for every pipeline rank, the bytes one GPU holds at
the peak of a training step and returns the largest (the ranks of one pipeline stage hold the same).
Every assumption is what training does with the same settings (training/loop.py, parallel/):

Placement (parallel/pipeline_stages.py): layers are split over pp x stages_per_rank stages with
`split_layers`; the first stage holds the embedding, the last the final norm, the head and the MTP
modules, which use that same embedding and head (no copies); under `zbv` / `dualpipev` rank r runs
stages r and 2P-1-r, so rank 0 holds the embedding, the head and the MTP modules once. Dense
parameters (attention, dense MLPs, shared experts, routers, norms, embedding, head, MTP modules
without their routed experts) are replicated over the dp x ep ranks of a stage; routed experts are
split over ep (E / ep per rank) and replicated over dp.

Bytes per parameter held by a rank (training/optim.py, parallel/data_parallel.py, kernels/weights.py):
- params: the parameters themselves in `precision.param_dtype` (4 B fp32, 2 B bf16); ZeRO-1
  all-gathers the updated parameters, so every rank holds all the weights of its stage.
- weight_copies: under fp8, the FP8 weight and its transposed copy (2 B + 128x128-block scales) of
  every weight the FP8 kernels run (kernels/weights.py keeps them from one optimizer step to the
  next; the head, router, embedding and norms are not FP8). precision=bf16 with fp32 parameters:
  autocast's bf16 copy of every GEMM weight (2 B; one per step, the pipeline step runs under one
  autocast context; embedding and router excluded, a lookup and an fp32 GEMM). The fused head
  loss casts the head per call: transient, not counted.
- grads: 4 B, fp32 until the step, whole on every rank (the `.grad` of fp32 parameters, the fp32
  accumulation buffer of bf16 ones), + 2 B for the bf16 `.grad` the zero-bubble schedules (zbv,
  dualpipev) keep per bf16 parameter.
- optimizer: `parallel.data_parallel.state_bytes_per_element`: AdamW moments (2 + 2 B with
  optim.moments_dtype=bf16, 4 + 4 B fp32), plus the 4 B fp32 master weight when the parameters are
  bf16; with ZeRO-1 dense state sharded over dp x ep and routed-expert state over dp. With
  `optim.offload=cpu` it lives in host memory (`host_memory_gib_per_gpu`, not in the GPU total).

Activations (model/memory.py: bytes per token and layer, head and MTP included): a rank holds, at
its peak, the activations of the (stage, micro-batch) pairs whose forward has run and whose
backward (B, or W for the split backward of the zero-bubble schedules: the weight gradient reads
the same cached inputs) has not. The peak is found by walking the rank's actions in the order the
schedule object itself executes them (parallel/pipeline_schedules.py `schedule_actions`), each
pair weighted by its stage's bytes, with n_microbatches = train.global_batch / (dp x ep x micro_batch)
when given, else enough micro-batches to reach the schedule's steady state: at most 2 x stages are
walked, the peak does not grow beyond them (tests/test_memory.py checks 4 x stages). pp = 1: one
micro-batch.

Not counted: CUDA context and allocator fragmentation, communication buffers (all-to-all, pipeline
send/recv, ZeRO's reduce-scatter and all-gather buffers, which live at the optimizer step when the
activations are gone), temporary workspaces (attention, GEMM, FP8 weight quantization, the head's
chunk of logits). Keep a few GiB of margin on top.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from model.config import ModelConfig
from model.flops import attention_params, block_params, expert_params, mtp_module_params
from model.memory import (GIB, PARAM_DTYPES, PRECISIONS, activation_bytes_per_token, head_bytes_per_token,
                          mtp_projection_bytes_per_token)

from .data_parallel import MOMENT_BYTES, state_bytes_per_element
from .pipeline_schedules import _leaves, check_microbatches, schedule_actions
from .pipeline_stages import V_SHAPED, check_schedule, rank_stages, split_layers

FP8_WEIGHT_BYTES = 2 + 8 / (128 * 128)
"""kernels/weights.py: an FP8 weight and its transposed copy, with fp32 scales per 128x128 block."""
OFFLOADS = ("none", "cpu")


@dataclass(frozen=True)
class Layout:
    """A training layout and the micro-batch shape (the `parallel.*`, `train.*`, `precision.*` and
    `optim.*` settings the estimate reads; defaults: model/summary.py takes them from configs/)."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = "1f1b"
    stages_per_rank: Optional[int] = None
    layers_per_stage: Optional[Sequence[int]] = None
    zero: bool = True
    micro_batch: int = 1
    seq_len: int = 4096
    global_batch: Optional[int] = None
    precision: str = "bf16"
    param_dtype: str = "fp32"
    moments_dtype: str = "bf16"
    offload: str = "none"
    fused_head_loss: bool = False
    gpus_per_node: int = 8

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def n_stages(self) -> int:
        return 1 if self.pp == 1 else self.pp * check_schedule(self.schedule, self.pp, self.stages_per_rank)

    def n_microbatches(self) -> Optional[int]:
        """Micro-batches per step and pipeline (train.global_batch / (dp x ep x micro_batch): every EP
        rank routes its own sequences, training/config.py `data_parallel_size`); None when
        train.global_batch is not given."""
        if self.global_batch is None:
            return None
        return self.global_batch // (self.dp * self.ep * self.micro_batch)


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Raise ValueError naming the setting when the layout cannot hold or train the model."""
    for key in ("pp", "dp", "ep", "micro_batch", "seq_len"):
        value = getattr(layout, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            prefix = "parallel" if key in ("pp", "dp", "ep") else "train"
            raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")
    if cfg.n_routed_experts % layout.ep:
        raise ValueError(f"model.n_routed_experts ({cfg.n_routed_experts}) is not divisible by "
                         f"parallel.ep ({layout.ep}): every EP rank holds n_routed_experts / ep experts")
    if layout.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {layout.precision!r}")
    if layout.param_dtype not in PARAM_DTYPES:
        raise ValueError(f"precision.param_dtype must be one of {sorted(PARAM_DTYPES)}, got {layout.param_dtype!r}")
    if layout.param_dtype == "bf16" and layout.precision == "fp32":
        raise ValueError("precision.param_dtype=bf16 needs precision=bf16 or fp8")
    for key, prefix in (("fused_head_loss", "precision"), ("zero", "parallel")):
        if not isinstance(getattr(layout, key), bool):
            raise ValueError(f"{prefix}.{key} must be true or false, got {getattr(layout, key)!r}")
    if layout.moments_dtype not in MOMENT_BYTES:
        raise ValueError(f"optim.moments_dtype must be one of {sorted(MOMENT_BYTES)}, got {layout.moments_dtype!r}")
    if layout.offload not in OFFLOADS:
        raise ValueError(f"optim.offload must be one of {OFFLOADS}, got {layout.offload!r}")
    n = layout.n_microbatches()
    if n is not None:
        if n < 1 or layout.global_batch % (layout.dp * layout.ep * layout.micro_batch):
            raise ValueError(f"train.global_batch ({layout.global_batch}) must be a positive multiple of "
                             f"parallel.dp x parallel.ep x train.micro_batch ({layout.dp * layout.ep * layout.micro_batch})")
        if layout.pp > 1:
            check_microbatches(layout.schedule, layout.pp, layout.n_stages // layout.pp, n)


def pipeline_stages(cfg: ModelConfig, layout: Layout) -> List[List[List[int]]]:
    """For every pipeline rank, its stages as lists of global layer indices (stage order kept)."""
    if layout.pp == 1:
        return [[list(range(cfg.num_hidden_layers))]]
    n_stages = layout.n_stages
    layers = split_layers(cfg.num_hidden_layers, n_stages, layout.layers_per_stage)
    return [[layers[s] for s in rank_stages(r, layout.pp, n_stages, layout.schedule)] for r in range(layout.pp)]


def holds_stage(layout: Layout, rank: int) -> Dict[str, bool]:
    """Whether pipeline rank `rank` runs the first stage and the last stage."""
    if layout.pp == 1:
        return {"first": True, "last": True}
    last_rank = 0 if layout.schedule in V_SHAPED else layout.pp - 1
    return {"first": rank == 0, "last": rank == last_rank}


def _routed(cfg: ModelConfig, layer_idx: int) -> int:
    return cfg.n_routed_experts * expert_params(cfg) if cfg.is_moe_layer(layer_idx) else 0


def _non_gemm(cfg: ModelConfig, layer_idx: int) -> int:
    """Parameters of block `layer_idx` that are no GEMM weight under autocast: norms and the router."""
    norms = attention_params(cfg)["norm"] + 2 * cfg.hidden_size
    return norms + (cfg.n_routed_experts * cfg.hidden_size if cfg.is_moe_layer(layer_idx) else 0)


def rank_param_counts(cfg: ModelConfig, layout: Layout) -> List[Dict[str, int]]:
    """Per pipeline rank: {"dense": parameters replicated over dp x ep, "experts": this EP rank's
    routed-expert parameters (E / ep of every MoE layer it holds, MTP blocks included), "gemm": those
    of both that are GEMM weights under autocast (embedding, router and norms excluded, the head too
    when the fused head loss casts it per chunk), "fp8_gemm": the GEMM weights the FP8 recipe runs
    in FP8 (all but the head)}."""
    check_layout(cfg, layout)
    D, V = cfg.hidden_size, cfg.vocab_size
    out = []
    for rank, stages in enumerate(pipeline_stages(cfg, layout)):
        ids = [i for stage in stages for i in stage]
        dense = sum(block_params(cfg, i)["total"] - _routed(cfg, i) for i in ids)
        routed = sum(_routed(cfg, i) for i in ids)
        non_gemm = sum(_non_gemm(cfg, i) for i in ids)
        holds = holds_stage(layout, rank)
        head = 0
        if holds["first"]:
            dense += V * D
            non_gemm += V * D
        if holds["last"]:
            head = 0 if cfg.tie_word_embeddings and holds["first"] else V * D
            dense += D + head
            non_gemm += D + (head if layout.fused_head_loss else 0)
            for k in range(cfg.num_nextn_predict_layers):
                idx = cfg.num_hidden_layers + k
                dense += mtp_module_params(cfg, k)["total"] - _routed(cfg, idx)
                routed += _routed(cfg, idx)
                non_gemm += 3 * D + _non_gemm(cfg, idx)
        experts = routed // layout.ep
        head_gemm = head if holds["last"] and not layout.fused_head_loss else 0
        out.append({"dense": dense, "experts": experts, "gemm": dense + experts - non_gemm,
                    "fp8_gemm": dense + experts - non_gemm - head_gemm})
    return out


def stage_bytes_per_token(cfg: ModelConfig, layout: Layout) -> List[float]:
    """Activation bytes per token of every pipeline stage (the last one with head and MTP modules)."""
    p, dt = layout.precision, layout.param_dtype
    layers = (split_layers(cfg.num_hidden_layers, layout.n_stages, layout.layers_per_stage) if layout.pp > 1
              else [list(range(cfg.num_hidden_layers))])
    out = [sum(activation_bytes_per_token(cfg, i, p, dt) for i in stage) for stage in layers]
    for k in range(cfg.num_nextn_predict_layers):
        out[-1] += (activation_bytes_per_token(cfg, cfg.num_hidden_layers + k, p, dt)
                    + mtp_projection_bytes_per_token(cfg, p, dt))
    out[-1] += (1 + cfg.num_nextn_predict_layers) * head_bytes_per_token(cfg, p, layout.fused_head_loss)
    return out


@lru_cache(maxsize=None)
def _forward_backward_order(schedule: str, pp: int, stages_per_rank: Optional[int],
                            n_microbatches: int) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """Per rank: (+1 for F, -1 for B or W, stage) in execution order (I frees nothing the W needs)."""
    sign = {"F": 1, "B": -1, "W": -1}
    return tuple(tuple((sign[leaf.computation_type.value], leaf.stage_index)
                       for a in actions for leaf in _leaves(a) if leaf.computation_type.value in sign)
                 for actions in schedule_actions(schedule, pp, n_microbatches, stages_per_rank))


def held_microbatches(layout: Layout, weights: Sequence[float]) -> List[float]:
    """Per pipeline rank: the peak over its action sequence of sum(weights[stage]) over the (stage,
    micro-batch) pairs forwarded and not yet through B or W (see the module docstring)."""
    n = min(layout.n_microbatches() or 2 * layout.n_stages, 2 * layout.n_stages)  # the peak stops growing there
    if layout.schedule == "1f1b":  # its warm-up, as the executed order shows (tests/test_memory.py)
        return [min(layout.pp - r, n) * weights[r] for r in range(layout.pp)]
    peaks = []
    for order in _forward_backward_order(layout.schedule, layout.pp, layout.stages_per_rank, n):
        held = peak = 0.0
        for sign, stage in order:
            held += sign * weights[stage]
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def rank_activation_bytes(cfg: ModelConfig, layout: Layout) -> List[float]:
    """Peak activation bytes of every pipeline rank."""
    tokens = layout.micro_batch * layout.seq_len
    per_stage = [b * tokens for b in stage_bytes_per_token(cfg, layout)]
    if layout.pp == 1:
        return per_stage
    return held_microbatches(layout, per_stage)


def rank_memory(cfg: ModelConfig, layout: Layout) -> List[Dict[str, float]]:
    """Per pipeline rank: {params_gib, weight_copies_gib, grads_gib, optimizer_gib, activations_gib,
    host_gib (the optimizer state `optim.offload=cpu` keeps in host memory)}."""
    counts = rank_param_counts(cfg, layout)
    acts = rank_activation_bytes(cfg, layout)
    param_bytes = PARAM_DTYPES[layout.param_dtype]
    state = state_bytes_per_element(layout.param_dtype, layout.moments_dtype, layout.offload == "cpu")
    dense_shards = layout.dp * layout.ep if layout.zero else 1
    expert_shards = layout.dp if layout.zero else 1
    rows = []
    for c, act in zip(counts, acts):
        n = c["dense"] + c["experts"]
        if layout.precision == "fp8":
            copies = c["fp8_gemm"] * FP8_WEIGHT_BYTES
        else:
            copies = c["gemm"] * 2 if layout.precision == "bf16" and layout.param_dtype == "fp32" else 0
        shard = c["dense"] / dense_shards + c["experts"] / expert_shards
        rows.append({"params_gib": n * param_bytes / GIB, "weight_copies_gib": copies / GIB,
                     "grads_gib": n * grad_bytes(layout) / GIB, "optimizer_gib": shard * state["device"] / GIB,
                     "activations_gib": act / GIB, "host_gib": shard * state["host"] / GIB})
    return rows


def grad_bytes(layout: Layout) -> int:
    """Bytes per parameter element of the gradients held until the step: fp32 (the `.grad` of fp32
    parameters, the accumulation buffer of bf16 ones), plus the bf16 `.grad` that the zero-bubble
    schedules keep per bf16 parameter (parallel/data_parallel.py)."""
    zero_bubble = layout.pp > 1 and layout.schedule in V_SHAPED
    return 4 + (2 if layout.param_dtype == "bf16" and zero_bubble else 0)


def memory_per_gpu(cfg: ModelConfig, layout: Layout) -> Dict[str, object]:
    """{"memory_gib_per_gpu", "memory_breakdown": {params_gib, weight_copies_gib, grads_gib,
    optimizer_gib, activations_gib}, "host_memory_gib_per_gpu" (optimizer state offloaded to the
    host), "layout": the layout echoed with world_size and the peak pipeline rank} and, with
    optim.offload=cpu, "offload": `offload_summary`."""
    rows = rank_memory(cfg, layout)
    host = [row.pop("host_gib") for row in rows]
    peak = max(range(len(rows)), key=lambda r: sum(rows[r].values()))
    echoed = {**asdict(layout), "world_size": layout.world_size, "peak_pp_rank": peak}
    if echoed["layers_per_stage"] is not None:
        echoed["layers_per_stage"] = list(echoed["layers_per_stage"])
    out = {"memory_gib_per_gpu": sum(rows[peak].values()), "memory_breakdown": rows[peak],
           "host_memory_gib_per_gpu": host[peak], "layout": echoed}
    if layout.offload == "cpu":
        out["offload"] = offload_summary(cfg, layout, peak, max(host))
    return out


def offload_summary(cfg: ModelConfig, layout: Layout, peak: int, host_gib: float) -> Dict[str, float]:
    """What optim.offload=cpu changes: {"gpu_gib_saved": the optimizer state the peak rank would hold
    on the GPU without offload (its moments, as configured, and the fp32 master of bf16 parameters),
    "host_gib_per_node": the most any rank keeps on the host times the GPUs of a node}."""
    kept = replace(layout, offload="none")
    saved = rank_memory(cfg, kept)[peak]["optimizer_gib"]
    return {"gpu_gib_saved": saved, "host_gib_per_node": host_gib * min(layout.gpus_per_node, layout.world_size)}
