"""`precision=fp8`: route the model's linears and experts through the FP8 kernels (DeepSeek-V3 section 3.3).

`apply_fp8(model)` switches, in place, every `nn.Linear` of the attention and MTP projections to
`FP8Linear`, and every SwiGLU (`MLP`: dense layers and shared experts; `GroupedExperts`: routed
experts) to its FP8 version. The switch changes the module's class to a subclass whose forward
calls `kernels.linear`; parameters, names, state_dict and hooks are untouched, so optimizers and
checkpoints built before or after keep working. Kept in BF16/FP32 per the recipe: the embedding,
the output head, the router, the norms, the attention core and the MoE combine. The input of the
linear after attention (`self_attn.o_proj`) is cached for backward in E5M6.

Memory (section 3.2.3 "recomputation of RMSNorm"): RMSNorms keep only their input for backward and
recompute the normalization there, instead of also holding the fp32 normalized output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear import fp8_linear, fp8_swiglu_experts

from .moe import MLP, GroupedExperts
from .norm import RMSNorm

KEPT_HIGH_PRECISION = ("lm_head",)
E5M6_CACHED = ("self_attn.o_proj",)


class FP8Linear(nn.Linear):
    """nn.Linear whose Fprop, Dgrad and Wgrad run in FP8 (set by `apply_fp8`, bias not supported)."""

    fp8_pow2: bool = True
    fp8_e5m6_cache: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fp8_pow2, self.fp8_e5m6_cache)


class FP8MLP(MLP):
    """Dense / shared-expert SwiGLU in FP8: one expert of the grouped FP8 SwiGLU path."""

    fp8_pow2: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8_swiglu_experts(x2, self.gate_proj.weight.unsqueeze(0), self.up_proj.weight.unsqueeze(0),
                               self.down_proj.weight.unsqueeze(0), [x2.shape[0]], self.fp8_pow2)
        return y.view(*x.shape[:-1], y.shape[-1])


class FP8GroupedExperts(GroupedExperts):
    """Routed experts in FP8: grouped GEMMs over rows sorted by expert, SwiGLU recomputed in backward."""

    fp8_pow2: bool = True

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = self.gate_up_proj.chunk(2, dim=1)
        return fp8_swiglu_experts(x_ND, w_gate, w_up, self.down_proj, counts_E.tolist(), self.fp8_pow2)


class _RecomputedRMSNormFunction(torch.autograd.Function):
    """RMSNorm.forward's exact computation, saving only (x, weight); backward recomputes it."""

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _RecomputedRMSNormFunction._norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = _RecomputedRMSNormFunction._norm(x_, w_, ctx.eps)
            dx, dw = torch.autograd.grad(y, (x_, w_), dy)
        return dx, dw, None


class RecomputedRMSNorm(RMSNorm):
    """RMSNorm that caches only its input for backward (same outputs and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RecomputedRMSNormFunction.apply(x, self.weight, self.eps)


_FP8_CLASS = {nn.Linear: FP8Linear, MLP: FP8MLP, GroupedExperts: FP8GroupedExperts,
              RMSNorm: RecomputedRMSNorm}
_FP8_CLASS.update({c: c for c in list(_FP8_CLASS.values())})


def _is_kept(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in KEPT_HIGH_PRECISION)


def apply_fp8(model: nn.Module, pow2_scales: bool = True) -> nn.Module:
    """Switch `model`'s linears and experts to FP8 in place (idempotent); returns the model.

    `pow2_scales` rounds every scale up to a power of 2, which makes the backward pass's 1x128 ->
    128x1 re-quantization of cached activations nearly lossless.
    """
    inside_swiglu = set()
    for name, module in model.named_modules():
        if id(module) in inside_swiglu or not isinstance(module, (nn.Linear, MLP, GroupedExperts, RMSNorm)):
            continue
        if isinstance(module, nn.Linear) and _is_kept(name):
            continue
        fp8_cls = _FP8_CLASS.get(type(module))
        if fp8_cls is None:
            raise TypeError(f"apply_fp8: {name} is a {type(module).__name__}, a subclass the FP8 recipe "
                            f"does not know; supported: nn.Linear, model.moe.MLP, model.moe.GroupedExperts, "
                            f"model.norm.RMSNorm")
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ValueError(f"apply_fp8: {name} has a bias; the FP8 Linear supports bias-free linears only")
        module.__class__ = fp8_cls
        if fp8_cls is RecomputedRMSNorm:
            continue
        module.fp8_pow2 = pow2_scales
        if fp8_cls is FP8Linear:
            module.fp8_e5m6_cache = any(name.endswith(n) for n in E5M6_CACHED)
        else:
            inside_swiglu.update(id(m) for m in module.modules())
    return model


def fp8_modules(model: nn.Module) -> dict:
    """Names of the modules `apply_fp8` switched, by kind (for logging and tests)."""
    kinds = {"linear": FP8Linear, "mlp": FP8MLP, "experts": FP8GroupedExperts, "norm": RecomputedRMSNorm}
    return {k: [n for n, m in model.named_modules() if isinstance(m, cls)] for k, cls in kinds.items()}
