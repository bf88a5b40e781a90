"""AdamW with fp32 master weights and low-precision (bf16) moments; gradient clipping.

DeepSeek-V3 section 3.3.2 ("Low-Precision Storage"): the optimizer tracks its first and second
moments in BF16 while master weights and gradients stay in FP32. The update is computed in fp32
(decoupled weight decay, bias-corrected moments, as in Loshchilov & Hutter's AdamW) and only the
stored moments are rounded. It steps fp32 parameters, which are their own master weights; a model
kept in bf16 gets its fp32 master weights from `parallel.data_parallel.Zero1`, which hands this
optimizer fp32 master shards.

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
MOMENTS = ("exp_avg", "exp_avg_sq")


def decays(name: str, param: torch.Tensor, decay_embeddings: bool) -> bool:
    """Whether weight decay applies: matrices (ndim >= 2) except the input embedding unless asked."""
    if param.ndim < 2:
        return False
    return decay_embeddings or name not in EMBEDDING_PARAMS


def decay_groups(named: List[Tuple[str, nn.Parameter]], weight_decay: float,
                 decay_embeddings: bool) -> List[Dict[str, object]]:
    """Parameter groups: those that decay (`decays`) with `weight_decay`, the others with 0."""
    decay = [p for n, p in named if decays(n, p, decay_embeddings)]
    no_decay = [p for n, p in named if not decays(n, p, decay_embeddings)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def named_state_dict(names: Dict[nn.Parameter, str], state, step: torch.Tensor) -> Dict[str, object]:
    """{"step": int64 tensor, "exp_avg": {name: t}, "exp_avg_sq": {name: t}}: an Adam state by name."""
    out: Dict[str, object] = {"step": step}
    for key in MOMENTS:
        out[key] = {names[p]: s[key] for p, s in state.items()}
    return out


def load_named_state_dict(names: Dict[nn.Parameter, str], state, step: torch.Tensor,
                          loaded: Dict[str, object]) -> None:
    """Copy a `named_state_dict` (same names and shapes, any moment dtype) into `state` and `step`."""
    step.copy_(loaded["step"])
    for p, s in state.items():
        for key in MOMENTS:
            s[key].copy_(loaded[key][names[p]])


class AdamW(torch.optim.Optimizer):
    """AdamW over named fp32 parameters; moments stored in `moments_dtype`, update math in fp32."""

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, decay_embeddings: bool = False,
                 moments_dtype: str = "bf16"):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        for n, p in named:
            if p.dtype != torch.float32:
                raise ValueError(f"AdamW steps fp32 parameters, {n} is {p.dtype}: a model in another dtype "
                                 "takes its fp32 master weights from parallel.data_parallel.Zero1")
        self.names: Dict[nn.Parameter, str] = {p: n for n, p in named}
        super().__init__(decay_groups(named, weight_decay, decay_embeddings),
                         {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.moments_dtype = DTYPES[moments_dtype]
        self.step_count = torch.zeros((), dtype=torch.int64)
        for _, p in named:
            state = self.state[p]
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)

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
                grad = p.grad.float()
                m = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / bias2).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)

    def state_dict(self) -> Dict[str, object]:
        """`named_state_dict`: {"step": int64 tensor, "exp_avg": {name: t}, "exp_avg_sq": {name: t}}."""
        return named_state_dict(self.names, self.state, self.step_count)

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Copy a state produced by `state_dict` (same names and shapes) into this optimizer."""
        load_named_state_dict(self.names, self.state, self.step_count, state)


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
