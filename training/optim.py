"""AdamW with fp32 master weights and low-precision (bf16) moments; gradient clipping.

DeepSeek-V3 section 3.3.2 ("Low-Precision Storage"): the optimizer tracks its first and second
moments in BF16 while master weights and gradients stay in FP32. The update is computed in fp32
(decoupled weight decay, bias-corrected moments, as in Loshchilov & Hutter's AdamW) and only the
stored moments are rounded. Parameters that are not fp32 (a model kept in bf16) get an fp32 master
copy in the optimizer state; fp32 parameters are their own master weights.

Weight decay applies to matrices only: not to norms or biases (1-D), and not to the input
embedding unless `decay_embeddings`. The state dict is keyed by parameter name, so a
torch.distributed.checkpoint of it does not depend on parameter order.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

EMBEDDING_PARAMS = ("embed_tokens.weight",)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def decays(name: str, param: torch.Tensor, decay_embeddings: bool) -> bool:
    """Whether weight decay applies: matrices (ndim >= 2) except the input embedding unless asked."""
    if param.ndim < 2:
        return False
    return decay_embeddings or name not in EMBEDDING_PARAMS


class AdamW(torch.optim.Optimizer):
    """AdamW over named parameters; moments stored in `moments_dtype`, update math in fp32."""

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, decay_embeddings: bool = False,
                 moments_dtype: str = "bf16"):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names: Dict[nn.Parameter, str] = {p: n for n, p in named}
        decay = [p for n, p in named if decays(n, p, decay_embeddings)]
        no_decay = [p for n, p in named if not decays(n, p, decay_embeddings)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.moments_dtype = DTYPES[moments_dtype]
        self.step_count = torch.zeros((), dtype=torch.int64)
        for _, p in named:
            state = self.state[p]
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
            if p.dtype != torch.float32:
                state["master"] = p.detach().float().clone()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamW.step does not take a closure")
        self.step_count += 1
        n = int(self.step_count)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            bias1, bias2 = 1 - beta1 ** n, 1 - beta2 ** n
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                master = state.get("master", p)
                grad = p.grad.float()
                m = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if wd:
                    master.mul_(1 - lr * wd)
                denom = (v / bias2).sqrt_().add_(eps)
                master.addcdiv_(m, denom, value=-lr / bias1)
                if master is not p:
                    p.copy_(master)

    def state_dict(self) -> Dict[str, object]:
        """{"step": int64 tensor, "exp_avg": {name: t}, "exp_avg_sq": {...}, "master": {...}} (by name)."""
        out: Dict[str, object] = {"step": self.step_count}
        for key in ("exp_avg", "exp_avg_sq", "master"):
            entries = {self.names[p]: s[key] for p, s in self.state.items() if key in s}
            if entries:
                out[key] = entries
        return out

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Copy a state produced by `state_dict` (same names and shapes) into this optimizer."""
        self.step_count.copy_(state["step"])
        for p, s in self.state.items():
            name = self.names[p]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in s:
                    s[key].copy_(state[key][name])


def grad_norm(params: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, accumulated in fp64 (an fp32 reduction over millions of elements
    drifts by ~1e-4 relative on CPU, enough to change clipping between process layouts); inf/nan
    propagate so the caller can skip the step."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))


def clip_grads(params: List[torch.Tensor], total_norm: float, max_norm: float) -> None:
    """Scale gradients by max_norm / total_norm when the norm exceeds max_norm (0 disables)."""
    if max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
