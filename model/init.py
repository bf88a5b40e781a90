"""Layout-independent initialization and rank-local materialization of a Transformer.

DeepSeek-V3 section 4.2 (every matrix Normal(0, 0.006), norms one; the input embedding may take its
own std, `ModelConfig.embed_init_std`, see `embedding_std`) with one property the report
needs at its scale (section 3.2: 16-way pipeline x 64-way expert parallelism): a parameter's initial
values depend only on (seed, its global name, and the expert index for routed experts). Each
parameter (each expert's slice of a stacked expert tensor) draws from its own CPU generator seeded
by a hash of that identity, so a rank that materializes one pipeline stage and 1/ep of the experts
holds exactly the values one process holds for those tensors.

A model declared on the meta device (`with torch.device("meta"): Transformer(cfg)`) holds no
memory; `materialize(model, names, device, seed)` allocates and initializes only the named
submodules (e.g. `embed_tokens`, `layers.3`, `mtp`), so nothing of another rank's parameters ever
exists on a rank.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import torch
from torch import nn

from .moe import MoE, GroupedExperts, Router
from .norm import RMSNorm
from .rope import RotaryEmbedding


def param_seed(seed: int, name: str, expert: Optional[int] = None) -> int:
    """Seed of the generator for parameter `name` (global dotted name), or of routed expert `expert` of it."""
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def _normal_(tensor: torch.Tensor, std: float, seed: int) -> None:
    """Fill `tensor` with Normal(0, std) drawn in fp32 on the CPU from a generator seeded with `seed`
    (the same values whatever the tensor's device and dtype)."""
    g = torch.Generator().manual_seed(seed)
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous():
        tensor.normal_(0.0, std, generator=g)
    else:
        tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def embedding_std(embed_init_std: Optional[float], std: float) -> float:
    """Std of the input embedding: `embed_init_std` when set, else the matrices' `std`.

    The embedding only feeds RMSNorms (scale-invariant) and the residual stream, so its scale is free
    at initialization, but it sets two things: AdamW moves each element by about lr per step, i.e. by
    lr / std of its size, and the first norm's Jacobian scales its gradient by 1 / std. The report pairs
    std 0.006 with a peak lr of 2.2e-4 (lr / std = 3.7%); a small model trained at a higher lr needs a
    larger embedding std to keep that ratio (configs/model/tiny.yaml)."""
    return std if embed_init_std is None else embed_init_std


@torch.no_grad()
def init_module(module: nn.Module, prefix: str, seed: int, std: float, embed_std: Optional[float] = None) -> None:
    """Initialize every parameter and buffer under `module`, whose global name is `prefix` ("" for the
    whole model): Normal(0, std) for matrices (per expert for stacked routed experts, expert
    `expert_offset + i` for row i) and Normal(0, embed_std) for embeddings (default `std`), ones for
    norms, zeros for router bias and load. ValueError names a parameter no rule covers."""
    done = set()
    for sub_name, sub in module.named_modules(prefix=prefix):
        own = {f"{sub_name}.{n}" if sub_name else n: p for n, p in sub.named_parameters(recurse=False)}
        if isinstance(sub, GroupedExperts):
            for name, p in own.items():
                for i in range(p.shape[0]):
                    _normal_(p[i], std, param_seed(seed, name, sub.expert_offset + i))
        elif isinstance(sub, RMSNorm):
            for p in own.values():
                p.fill_(1.0)
        elif isinstance(sub, (nn.Linear, nn.Embedding, Router)):
            own_std = embedding_std(embed_std, std) if isinstance(sub, nn.Embedding) else std
            _normal_(sub.weight, own_std, param_seed(seed, f"{sub_name}.weight" if sub_name else "weight"))
        if isinstance(sub, Router):
            sub.e_score_correction_bias.zero_()
            sub.tokens_per_expert.zero_()
        if isinstance(sub, MoE):
            sub.last_balance_loss = torch.zeros((), device=sub.gate.weight.device)
        done.update(id(p) for p in sub.parameters(recurse=False))
    missing = [n for n, p in module.named_parameters(prefix=prefix) if id(p) not in done]
    if missing:
        raise ValueError(f"init_module: no initialization rule for {', '.join(missing)}")


@torch.no_grad()
def materialize(model: nn.Module, names: Iterable[str], device: torch.device, seed: int,
                std: Optional[float] = None) -> nn.Module:
    """Allocate on `device` and initialize the submodules
    `names` of a Transformer declared on the meta device; the rotary tables are rebuilt on `device`
    and everything else stays on meta. A tied head is re-tied to the embedding. Returns the model."""
    std = model.cfg.initializer_range if std is None else std
    for name in names:
        sub = model.get_submodule(name)
        sub.to_empty(device=device)
        init_module(sub, name, seed, std, model.cfg.embed_init_std)
    if model.cfg.tie_word_embeddings and model.embed_tokens.weight.device.type != "meta":
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(model.cfg).to(device)
    return model


def is_materialized(t: torch.Tensor) -> bool:
    """Whether a tensor holds memory (is not on the meta device)."""
    return t.device.type != "meta"


def materialized_device(model: nn.Module) -> torch.device:
    """Device of the first parameter of `model` that is not on the meta device."""
    for p in model.parameters():
        if is_materialized(p):
            return p.device
    raise ValueError("the model has no materialized parameter")
