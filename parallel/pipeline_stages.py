"""Pipeline stages: which layers each stage holds, which rank runs it, and the stage module itself.

DeepSeek-V3 section 3.2.1 trains with pipeline parallelism (DualPipe); the V-shaped placement used
here for `zbv` and `dualpipev` (rank r runs stages r and 2P-1-r, "cut-in-half" DualPipe) puts the
embedding (first stage) and the output head with the MTP modules (last stage) on the same rank, as
the report describes for its MTP/embedding sharing (section 2.2).

A stage module holds *references* to the Transformer's own submodules (embedding, `layers[<i>]`,
norm, head, MTP), so its parameters keep their original names and a checkpoint does not depend on
the pipeline layout.

How the MTP modules get the embedding of later tokens (token i+k): the MTP modules live on the last
stage and need emb(t_{i+k}); the embedding table lives on the first stage.

- V-shaped schedules (`zbv`, `dualpipev`): the first and the last stage are on the same rank, so the
  last stage module refers to the very same `embed_tokens` module and looks the tokens up itself
  (the tokens reach every stage as a keyword argument, they are not part of the activations).
  Nothing extra crosses ranks and both uses accumulate into one gradient.
- Other schedules (`1f1b`, `interleaved_1f1b`): the first stage sends the embedding output e
  ([micro_batch, S, D], the same tensor that enters layer 0) along with the hidden state; every stage
  passes it on unchanged and the last stage uses e[:, k:]. Its gradient flows back through the
  normal pipeline backward into the single embedding table on the first stage. This costs one more
  activation-sized message per hop, but never moves the [vocab, D] table or its gradient: a tied
  copy on the last stage would need the full table's gradient all-reduced (or the table
  re-broadcast) every step, which for DeepSeek-V3 (129280 x 7168) is far more than the activations.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from model.config import ModelConfig
from model.transformer import Transformer, next_token_losses

DEFAULT_STAGES_PER_RANK = {"1f1b": 1, "interleaved_1f1b": 2, "zbv": 2, "dualpipev": 2}
V_SHAPED = ("zbv", "dualpipev")


def check_schedule(schedule: str, pp: int, stages_per_rank: Optional[int]) -> int:
    """Validate `parallel.schedule` / `parallel.pp` / `parallel.stages_per_rank`; return stages per rank."""
    if schedule not in DEFAULT_STAGES_PER_RANK:
        raise ValueError(f"parallel.schedule must be one of {sorted(DEFAULT_STAGES_PER_RANK)}, got {schedule!r}")
    if not isinstance(pp, int) or pp < 2:
        raise ValueError(f"pipeline parallelism needs parallel.pp >= 2, got {pp!r}")
    spr = DEFAULT_STAGES_PER_RANK[schedule] if stages_per_rank is None else stages_per_rank
    if schedule == "1f1b" and spr != 1:
        raise ValueError(f"parallel.schedule=1f1b runs one stage per rank; parallel.stages_per_rank={spr} "
                         "needs parallel.schedule=interleaved_1f1b")
    if schedule == "interleaved_1f1b" and (not isinstance(spr, int) or spr < 2):
        raise ValueError(f"parallel.schedule=interleaved_1f1b needs parallel.stages_per_rank >= 2, got {spr!r}")
    if schedule in V_SHAPED and spr != 2:
        raise ValueError(f"parallel.schedule={schedule} places exactly 2 stages per rank (V shape), "
                         f"got parallel.stages_per_rank={spr!r}")
    return spr


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """Pipeline rank that runs `stage`: V shape (r holds r and 2P-1-r) or looped (stage mod P)."""
    if schedule in V_SHAPED:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(rank: int, pp: int, n_stages: int, schedule: str) -> List[int]:
    """Stages run by pipeline rank `rank`, in increasing order."""
    return [s for s in range(n_stages) if stage_rank(s, pp, schedule) == rank]


def split_layers(n_layers: int, n_stages: int, layers_per_stage: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Global layer indices of each stage.

    Default: n_layers // n_stages each; the remainder goes to the middle stages first (stage 1, 2, ...)
    because the first stage also runs the embedding and the last one the head and the MTP modules.
    An explicit `parallel.layers_per_stage` lists the count of every stage; middle stages need >= 1
    layer, the first and the last may hold none.
    """
    if layers_per_stage is None:
        if n_layers < n_stages:
            raise ValueError(f"model.num_hidden_layers ({n_layers}) must be >= the number of pipeline stages "
                             f"(parallel.pp x stages per rank = {n_stages})")
        counts = [n_layers // n_stages] * n_stages
        middle = list(range(1, n_stages - 1)) or [0]
        order = middle + [s for s in range(n_stages) if s not in middle]
        for i in range(n_layers % n_stages):
            counts[order[i % len(order)]] += 1
    else:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != n_stages:
            raise ValueError(f"parallel.layers_per_stage has {len(counts)} entries but there are {n_stages} "
                             "stages (parallel.pp x stages per rank)")
        if sum(counts) != n_layers or min(counts) < 0:
            raise ValueError(f"parallel.layers_per_stage {counts} must be >= 0 and sum to "
                             f"model.num_hidden_layers ({n_layers})")
        if any(c < 1 for c in counts[1:-1]):
            raise ValueError(f"parallel.layers_per_stage {counts}: every middle stage needs at least one layer")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_parts(stage: int, n_stages: int, layer_ids: Sequence[int], local_mtp_embedding: bool) -> List[str]:
    """Names of the Transformer submodules a stage uses: `embed_tokens` on the first stage (and on the
    last when it looks up the MTP embeddings itself), `layers.<i>`, and `norm`, `lm_head`, `mtp` on
    the last."""
    is_first, is_last = stage == 0, stage == n_stages - 1
    parts = ["embed_tokens"] if is_first or (is_last and local_mtp_embedding) else []
    parts += [f"layers.{i}" for i in layer_ids]
    return parts + (["norm", "lm_head", "mtp"] if is_last else [])


def rank_parts(cfg: ModelConfig, pp: int = 1, pp_rank: int = 0, schedule: str = "1f1b",
               stages_per_rank: Optional[int] = None, layers_per_stage: Optional[Sequence[int]] = None) -> List[str]:
    """Names of the Transformer submodules pipeline rank `pp_rank` holds, in model order (all of them
    when pp = 1): the union of its stages' `stage_parts`, as `Pipeline` places them."""
    every = ["embed_tokens", *(f"layers.{i}" for i in range(cfg.num_hidden_layers)), "norm", "lm_head", "mtp"]
    if pp == 1:
        return every
    n_stages = pp * check_schedule(schedule, pp, stages_per_rank)
    split = split_layers(cfg.num_hidden_layers, n_stages, layers_per_stage)
    local_mtp_embedding = cfg.num_nextn_predict_layers > 0 and schedule in V_SHAPED
    held = {p for s in rank_stages(pp_rank, pp, n_stages, schedule)
            for p in stage_parts(s, n_stages, split[s], local_mtp_embedding)}
    return [p for p in every if p in held]


class StageModule(nn.Module):
    """One pipeline stage of a Transformer.

    forward(*activations, labels) -> next activations, or on the last stage a [2] fp32 tensor
    (main next-token CE, mean MTP CE). `labels` [b, S] are the next tokens (tokens[:, 1:]) and reach
    every stage as a keyword argument. Activations: first stage gets tokens [b, S]; the others get
    h [b, S, D] (and the embedding output e when `carry_embedding`).

    `wire_dtype` (e.g. bf16 under bf16 autocast or FP8, as DeepSeek-V3 sends them): activations leave
    the stage in that dtype, so they and their gradients cross ranks in half the bytes of fp32, and
    are widened back to the residual stream's dtype (the embedding's) on arrival.
    """

    def __init__(self, model: Transformer, stage: int, n_stages: int, layer_ids: Sequence[int], *,
                 carry_embedding: bool, local_mtp_embedding: bool, wire_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.residual_dtype = model.embed_tokens.weight.dtype
        self.wire_dtype = wire_dtype or self.residual_dtype
        self.stage, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.carry_embedding = carry_embedding
        self.local_mtp_embedding = local_mtp_embedding
        self.parts = stage_parts(stage, n_stages, layer_ids, local_mtp_embedding)
        for name in ("embed_tokens", "norm", "lm_head", "mtp"):
            if name in self.parts:
                setattr(self, name, getattr(model, name))
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.fused_head_loss = model.fused_head_loss
        self.rotary = model.rotary
        self.hidden_size = model.cfg.hidden_size

    def forward(self, *acts: torch.Tensor, labels: torch.Tensor):
        if self.is_first:
            h = self.embed_tokens(acts[0])
            e = h if self.carry_embedding else None
        else:
            h = acts[0].to(self.residual_dtype)
            e = acts[1].to(self.residual_dtype) if self.carry_embedding else None
        rope = self.rotary(h.shape[1])
        for block in self.layers.values():
            h = block(h, rope)
        if not self.is_last:
            h = h.to(self.wire_dtype)
            return (h, e.to(self.wire_dtype)) if self.carry_embedding else h
        return self._losses(h, e, labels)

    def _losses(self, h_BSD: torch.Tensor, e_BSD: Optional[torch.Tensor], labels_BS: torch.Tensor) -> torch.Tensor:
        """stack([CE of the head, mean over depths of the MTP CE]) as in `model.transformer.lm_loss`."""
        emb_next = None
        if len(self.mtp) and h_BSD.shape[1] > 1:
            # embedding of input tokens 1..S-1 (input token j+1 is label j)
            emb_next = self.embed_tokens(labels_BS[:, :-1]) if self.local_mtp_embedding else e_BSD[:, 1:]
        return torch.stack(next_token_losses(self, h_BSD, emb_next, labels_BS, self.fused_head_loss))

    def io_shapes(self, micro_batch: int, seq_len: int) -> Tuple[tuple, tuple]:
        """Example (inputs, outputs) on the meta device: the static shapes (and `wire_dtype`) the
        schedule allocates."""
        act = torch.empty(micro_batch, seq_len, self.hidden_size, dtype=self.wire_dtype, device="meta")
        n_act = 2 if self.carry_embedding else 1
        inputs = ((torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta"),) if self.is_first
                  else tuple(act.clone().requires_grad_(True) for _ in range(n_act)))
        outputs = ((torch.empty(2, dtype=torch.float32, device="meta"),) if self.is_last
                   else tuple(act.clone().requires_grad_(True) for _ in range(n_act)))
        return inputs, outputs


class LocalModel(nn.Module):
    """The part of the Transformer held by one pipeline rank, under the Transformer's own names.

    `state_dict()` is exactly the subset of the full model's state dict that this rank holds, so an
    optimizer, a data-parallel wrapper or a checkpoint sees the original parameter names.
    """

    def __init__(self, model: Transformer, stages: Sequence[StageModule]):
        super().__init__()
        parts = {p for s in stages for p in s.parts}
        if "embed_tokens" in parts:
            self.embed_tokens = model.embed_tokens
        layers: Dict[str, nn.Module] = {}
        for s in stages:
            layers.update(s.layers.items())
        self.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        if "lm_head" in parts:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
