"""Training memory per GPU of a (pp, dp, ep) layout: the one place for the formula.

DeepSeek-V3 sections 3.2 (16-way DualPipe PP x 64-way EP x ZeRO-1 DP), 3.2.3 (recomputation of
RMSNorm and MLA up-projections) and 3.3 (FP8 caching of activations, BF16 optimizer moments).
`memory_per_gpu(cfg, Layout(...))` estimates, for every pipeline rank, the bytes one GPU holds at the
peak of a training step and returns the largest (ranks within a pipeline stage hold the same).

Layout (as in `configs/parallel/default.yaml`): world = pp x dp x ep. Dense parameters (attention,
dense MLPs, shared experts, routers, norms, embedding, head, MTP modules without their routed
experts) are replicated over the dp x ep ranks of a stage; routed experts are split over ep
(E / ep per rank) and replicated over dp.

Pipeline placement (parallel/pipeline_stages.py): layers are split over pp x stages_per_rank stages
with `split_layers`; the first stage holds the embedding, the last the final norm, the head and the
MTP modules; under `zbv` / `dualpipev` rank r runs stages r and 2P-1-r, so rank 0 holds the
embedding *and* the head with the MTP modules. A tied embedding is counted once per rank holding it.

Bytes per parameter held by a rank (training/optim.py, parallel/data_parallel.py):
- params: 4 B fp32 weight (the fp32 parameter is its own master weight, and our ZeRO-1 all-gathers
  the updated parameters, so every rank holds all the weights of its stage) + a 2 B bf16 working
  copy under precision=bf16 or fp8 (autocast's cast of each weight, kept for backward; under fp8
  the GEMMs quantize from it per call and those FP8 copies are counted as transient); 0 under fp32.
- grads: 4 B fp32 gradient, whole on every rank (reduce-scattered only at the step).
- optimizer: AdamW moments, 2 + 2 B (optim.moments_dtype=bf16) or 4 + 4 B (fp32). With
  parallel.zero (ZeRO-1) dense moments are sharded over dp x ep and routed-expert moments over dp.
  `Layout.zero` defaults to True here (the recommended layouts use it; it is a no-op at dp = ep = 1).

Activations per token and layer (bytes; r = 4 B, the fp32 residual stream, fp32 because the master
weights are fp32 and autocast only casts GEMM inputs; h = 2 B, the bf16 element (norm outputs),
4 B under fp32; f = the size of an FP8-cached element: 1 B under fp8, 2 B under bf16, 4 B under
fp32, plus s = 4/128 B of fp32 scale per element under fp8; e = 1.5 B for o_proj's E5M6-cached
input under fp8, else h), following the FP8 recipe's caching and recomputation (model/fp8.py):
RMSNorms keep their input, MLA keeps its normalized input and recomputes projections and the
attention core, o_proj's input is kept in E5M6, expert inputs and SwiGLU inputs are kept in FP8,
the SwiGLU output is recomputed:

    attention:   D r + D h  (norm input, MLA input)  +  H v_head_dim e + 4  (o_proj input, its scale)
    dense MLP:   D r (norm input)  +  (D + 2 I) (f + s)
    MoE:         D r + D h (norm input, router input)  +  4 E (fp32 scores)
                 + k ((D + 2 I_moe) (f + s) + 32)   routed experts: input and SwiGLU input, plus per
                                    (token, expert) pair the fp32 gate weight (applied before the
                                    down projection, so no output is kept), the int64 expert index
                                    and the two int64 permutation indices
                 + n_shared (D + 2 I_moe) (f + s)   shared experts

MTP modules count as layers of the last stage, plus 2 D r for their enorm/hnorm inputs and
2 D (f + s) for eh_proj's input. The head adds 6 V B per token and prediction (bf16 logits and
their fp32 copy for the cross-entropy) once, on the last stage, for 1 + num_nextn_predict_layers
predictions; with `fused_head_loss` (model/head_loss.py, on under precision=fp8) only its input
and the label, D h + 8 B.
For precision=bf16/fp32 the model does not recompute MLA, so the estimate is a lower bound there.

Micro-batches in flight (multiplier of one micro-batch's activations of all the rank's layers):
pp = 1: 1; 1f1b: pp - r on rank r; interleaved_1f1b with v stages per rank (Megatron's warm-up):
(2 (pp - r - 1) + (v - 1) pp + 1) / v; zbv: pp (Qi et al. 2024: ZB-V's peak equals 1F1B's);
dualpipev: pp + 1 (DeepSeek-V3 Table 2: DualPipe's activation memory is PP + 1 micro-batches of a
rank's layers, against PP for 1F1B; i.e. about 2 (pp + 1) micro-batches of each half-size stage).

Not counted: CUDA context and allocator fragmentation, communication buffers (all-to-all, pipeline
send/recv), temporary workspaces (attention, GEMM, the transient FP8 weight copies). Keep a few GiB
of margin on top.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from parallel.pipeline_stages import V_SHAPED, check_schedule, rank_stages, split_layers

from .config import ModelConfig
from .flops import block_params, expert_params, mtp_module_params

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp8")
MOMENT_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Layout:
    """A training layout and the micro-batch shape (the `parallel.*` and `train.*` settings)."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = "1f1b"
    stages_per_rank: Optional[int] = None
    layers_per_stage: Optional[Sequence[int]] = None
    zero: bool = True
    micro_batch: int = 1
    seq_len: int = 4096
    precision: str = "bf16"
    moments_dtype: str = "bf16"
    fused_head_loss: bool = False


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Raise ValueError naming the setting when the layout cannot hold the model."""
    for key in ("pp", "dp", "ep", "micro_batch", "seq_len"):
        value = getattr(layout, key)
        if not isinstance(value, int) or value < 1:
            prefix = "parallel" if key in ("pp", "dp", "ep") else "train"
            raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")
    if cfg.n_routed_experts % layout.ep:
        raise ValueError(f"model.n_routed_experts ({cfg.n_routed_experts}) is not divisible by "
                         f"parallel.ep ({layout.ep}): every EP rank holds n_routed_experts / ep experts")
    if layout.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {layout.precision!r}")
    if not isinstance(layout.fused_head_loss, bool):
        raise ValueError(f"precision.fused_head_loss must be true or false, got {layout.fused_head_loss!r}")
    if layout.moments_dtype not in MOMENT_BYTES:
        raise ValueError(f"optim.moments_dtype must be one of {sorted(MOMENT_BYTES)}, got {layout.moments_dtype!r}")


def pipeline_stages(cfg: ModelConfig, layout: Layout) -> List[List[List[int]]]:
    """For every pipeline rank, its stages as lists of global layer indices (stage order kept)."""
    if layout.pp == 1:
        return [[list(range(cfg.num_hidden_layers))]]
    spr = check_schedule(layout.schedule, layout.pp, layout.stages_per_rank)
    n_stages = layout.pp * spr
    layers = split_layers(cfg.num_hidden_layers, n_stages, layout.layers_per_stage)
    return [[layers[s] for s in rank_stages(r, layout.pp, n_stages, layout.schedule)] for r in range(layout.pp)]


def _holds(layout: Layout, rank: int) -> Dict[str, bool]:
    """Whether pipeline rank `rank` runs the first stage and the last stage."""
    if layout.pp == 1:
        return {"first": True, "last": True}
    last_rank = 0 if layout.schedule in V_SHAPED else layout.pp - 1
    return {"first": rank == 0, "last": rank == last_rank}


def _routed(cfg: ModelConfig, layer_idx: int) -> int:
    return cfg.n_routed_experts * expert_params(cfg) if cfg.is_moe_layer(layer_idx) else 0


def rank_param_counts(cfg: ModelConfig, layout: Layout) -> List[Dict[str, int]]:
    """Per pipeline rank: {"dense": parameters replicated over dp x ep, "experts": this EP rank's
    routed-expert parameters (E / ep of every MoE layer it holds, MTP blocks included)}."""
    check_layout(cfg, layout)
    D, V = cfg.hidden_size, cfg.vocab_size
    out = []
    for rank, stages in enumerate(pipeline_stages(cfg, layout)):
        ids = [i for stage in stages for i in stage]
        dense = sum(block_params(cfg, i)["total"] - _routed(cfg, i) for i in ids)
        routed = sum(_routed(cfg, i) for i in ids)
        holds = _holds(layout, rank)
        if holds["first"]:
            dense += V * D
        if holds["last"]:
            dense += D + (0 if cfg.tie_word_embeddings and holds["first"] else V * D)
            for k in range(cfg.num_nextn_predict_layers):
                idx = cfg.num_hidden_layers + k
                dense += mtp_module_params(cfg, k)["total"] - _routed(cfg, idx)
                routed += _routed(cfg, idx)
        out.append({"dense": dense, "experts": routed // layout.ep})
    return out


RESIDUAL_BYTES = 4
"""r of the module docstring: the fp32 residual stream."""


def element_bytes(precision: str) -> Dict[str, float]:
    """{"h": a bf16 activation (4 B under fp32), "f": an FP8-cached element with its share of the
    1x128 scale (bf16 / fp32 when not fp8), "e": o_proj's cached input (E5M6 under fp8)}."""
    h = 4 if precision == "fp32" else 2
    return {"h": h, "f": {"fp32": 4, "bf16": 2, "fp8": 1 + 4 / 128}[precision], "e": 1.5 if precision == "fp8" else h}


def activation_bytes_per_token(cfg: ModelConfig, layer_idx: int, precision: str) -> float:
    """Bytes kept for backward per token by block `layer_idx` (formula in the module docstring)."""
    r, b = RESIDUAL_BYTES, element_bytes(precision)
    h, f, e = b["h"], b["f"], b["e"]
    D = cfg.hidden_size
    attn = D * (r + h) + cfg.num_attention_heads * cfg.v_head_dim * e + 4
    if not cfg.is_moe_layer(layer_idx):
        return attn + D * r + (D + 2 * cfg.intermediate_size) * f
    I = cfg.moe_intermediate_size
    moe = D * (r + h) + 4 * cfg.n_routed_experts
    moe += cfg.num_experts_per_tok * ((D + 2 * I) * f + 32)
    moe += cfg.n_shared_experts * (D + 2 * I) * f
    return attn + moe


def mtp_projection_bytes_per_token(cfg: ModelConfig, precision: str) -> float:
    """What an MTP module keeps besides its block: enorm and hnorm inputs (fp32) and eh_proj's input."""
    return 2 * cfg.hidden_size * (RESIDUAL_BYTES + element_bytes(precision)["f"])


def in_flight(layout: Layout, rank: int) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak (module docstring)."""
    pp = layout.pp
    if pp == 1:
        return 1.0
    if layout.schedule == "1f1b":
        return float(pp - rank)
    if layout.schedule == "interleaved_1f1b":
        v = check_schedule(layout.schedule, pp, layout.stages_per_rank)
        return (2 * (pp - rank - 1) + (v - 1) * pp + 1) / v
    return float(pp + 1 if layout.schedule == "dualpipev" else pp)


def rank_activation_bytes(cfg: ModelConfig, layout: Layout) -> List[float]:
    """Peak activation bytes of every pipeline rank."""
    tokens = layout.micro_batch * layout.seq_len
    h = element_bytes(layout.precision)["h"]
    out = []
    for rank, stages in enumerate(pipeline_stages(cfg, layout)):
        per_token = sum(activation_bytes_per_token(cfg, i, layout.precision) for stage in stages for i in stage)
        head = 0
        if _holds(layout, rank)["last"]:
            for k in range(cfg.num_nextn_predict_layers):
                per_token += activation_bytes_per_token(cfg, cfg.num_hidden_layers + k, layout.precision)
                per_token += mtp_projection_bytes_per_token(cfg, layout.precision)
            per_prediction = cfg.hidden_size * h + 8 if layout.fused_head_loss else 6 * cfg.vocab_size
            head = per_prediction * (1 + cfg.num_nextn_predict_layers) * tokens
        out.append(per_token * tokens * in_flight(layout, rank) + head)
    return out


def memory_per_gpu(cfg: ModelConfig, layout: Layout) -> Dict[str, object]:
    """{"memory_gib_per_gpu", "memory_breakdown": {params_gib, grads_gib, optimizer_gib,
    activations_gib}, "layout": the layout echoed with world_size and the peak pipeline rank}."""
    counts = rank_param_counts(cfg, layout)
    acts = rank_activation_bytes(cfg, layout)
    weight_bytes = 4 + (0 if layout.precision == "fp32" else 2)
    moment_bytes = 2 * MOMENT_BYTES[layout.moments_dtype]
    dense_shards = layout.dp * layout.ep if layout.zero else 1
    expert_shards = layout.dp if layout.zero else 1
    rows = []
    for c, act in zip(counts, acts):
        n = c["dense"] + c["experts"]
        rows.append({"params_gib": n * weight_bytes / GIB, "grads_gib": n * 4 / GIB,
                     "optimizer_gib": (c["dense"] / dense_shards + c["experts"] / expert_shards) * moment_bytes / GIB,
                     "activations_gib": act / GIB})
    peak = max(range(len(rows)), key=lambda r: sum(rows[r].values()))
    echoed = {**asdict(layout), "world_size": layout.pp * layout.dp * layout.ep, "peak_pp_rank": peak}
    if echoed["layers_per_stage"] is not None:
        echoed["layers_per_stage"] = list(echoed["layers_per_stage"])
    return {"memory_gib_per_gpu": sum(rows[peak].values()), "memory_breakdown": rows[peak], "layout": echoed}
