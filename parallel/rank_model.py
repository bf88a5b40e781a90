"""One rank's part of the model, built without ever holding another rank's parameters.

DeepSeek-V3 section 3.2 (16-way pipeline x 64-way expert parallelism x ZeRO-1 data parallelism):
at that scale no process can hold the whole model. `build_rank_model` declares the Transformer on
the meta device, keeps this EP rank's slice of the routed experts (still on meta), and materializes
only the submodules its pipeline rank runs (`pipeline_stages.rank_parts`: its layers, plus the
embedding, final norm, head and MTP modules where its stages hold them). Initial values depend only
on (seed, global parameter name, expert index) (`model/init.py`), so one process and every
(pp, ep, dp) layout start from bitwise-identical weights.

It needs no process group: with `device="meta"` nothing is allocated, which is how the memory
planner counts the parameters of any rank of any layout (e.g. `v3_671b` at pp=16 DualPipeV x ep=64).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from model.config import ModelConfig
from model.init import materialize
from model.moe import GroupedExperts
from model.transformer import Transformer

from .expert_parallel import keep_expert_slice
from .pipeline_stages import rank_parts


@dataclass
class RankModel:
    """A Transformer declared whole on the meta device, of which `parts` (top-level submodule names)
    hold this rank's parameters (materialized unless built on meta) and its experts are the rank's slice."""

    model: Transformer
    parts: List[str]

    def named_parameters(self) -> Dict[str, nn.Parameter]:
        """This rank's parameters by global name (a tied head counted once, under the embedding's name)."""
        out: Dict[str, nn.Parameter] = {}
        seen = set()
        for part in self.parts:
            for name, p in self.model.get_submodule(part).named_parameters(prefix=part):
                if id(p) not in seen:
                    seen.add(id(p))
                    out[name] = p
        return out

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """This rank's parameters and persistent buffers by global name (sharing their memory)."""
        out: Dict[str, torch.Tensor] = {}
        for part in self.parts:
            out.update(self.model.get_submodule(part).state_dict(prefix=part + "."))
        return out

    def expert_offsets(self) -> Dict[str, int]:
        """Global index of the first routed expert of each stacked expert tensor, by name."""
        return {f"{name}.{p}": m.expert_offset for name, m in self.model.named_modules()
                if isinstance(m, GroupedExperts) for p in ("gate_up_proj", "down_proj")}

    def numel(self) -> int:
        """Number of parameter elements this rank holds."""
        return sum(p.numel() for p in self.named_parameters().values())


def build_rank_model(cfg: ModelConfig, *, seed: int, device: Union[str, torch.device] = "cpu", pp: int = 1,
                     pp_rank: int = 0, ep: int = 1, ep_rank: int = 0, schedule: str = "1f1b",
                     stages_per_rank: Optional[int] = None, layers_per_stage: Optional[Sequence[int]] = None,
                     fp8: bool = False) -> RankModel:
    """The modules of rank (pp_rank, ep_rank) of a pp x ep layout (dp replicas hold the same), built
    as the trainer does; parameters on `device` ("meta": nothing allocated). `fp8` switches the
    modules to the FP8 recipe (`model.fp8.apply_fp8`) before they are materialized."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if fp8:
        importlib.import_module("model.fp8").apply_fp8(model)
    if ep > 1:
        keep_expert_slice(model, ep_rank, ep)
    parts = rank_parts(cfg, pp, pp_rank, schedule, stages_per_rank, layers_per_stage)
    if torch.device(device).type != "meta":
        materialize(model, parts, torch.device(device), seed)
    return RankModel(model, parts)
