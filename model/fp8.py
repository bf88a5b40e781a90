"""`precision=fp8`: route the model's linears and experts through the FP8 kernels (DeepSeek-V3 section 3.3).

`apply_fp8(model)` switches, in place, every `nn.Linear` of the attention and MTP projections to
`FP8Linear`, every SwiGLU (`MLP`: dense layers and shared experts; `GroupedExperts`: routed
experts) to its FP8 version, and RMSNorm and MLA to versions that recompute in backward. The switch
changes the module's class to a subclass whose forward calls `kernels.linear` or recomputes;
parameters, names, state_dict and hooks are untouched, so optimizers and
checkpoints built before or after keep working. Kept in BF16/FP32 per the recipe: the embedding,
the output head, the router, the norms, the attention core and the MoE combine. The input of the
linear after attention (`self_attn.o_proj`) is cached for backward in E5M6.

Memory (section 3.2.3, recomputation of RMSNorm and of the MLA up-projections): RMSNorms keep only
their input for backward. MLA keeps only its normalized input and recomputes its projections, RoPE
and attention core in backward: PyTorch's attention keeps q, k and v (the up-projected tensors) for
its backward, so not storing them means re-running the core too; this recomputes a little more than
the report (the down-projections as well) and stores less. o_proj is outside the recomputation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kernels.linear import fp8_linear, fp8_swiglu_experts

from .mla import MLA
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
        w_gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight]).unsqueeze(0)
        sources = ((self.gate_proj.weight, self.up_proj.weight), (self.down_proj.weight,))
        y = fp8_swiglu_experts(x2, w_gate_up, self.down_proj.weight.unsqueeze(0), None, self.fp8_pow2,
                               weight_sources=sources)
        return y.view(*x.shape[:-1], y.shape[-1])


class FP8GroupedExperts(GroupedExperts):
    """Routed experts in FP8: grouped GEMMs over rows sorted by expert, SwiGLU recomputed in backward."""

    fp8_pow2: bool = True

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor,
                row_weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fp8_swiglu_experts(x_ND, self.gate_up_proj, self.down_proj, counts_E, self.fp8_pow2, row_weight_N)


class _Recompute(torch.autograd.Function):
    """fn(*inputs) keeping only `inputs` for backward, which re-runs fn under the same autocast state.

    `params` (the parameters fn uses) are passed through so that their gradients are returned here.
    Inputs are saved with save_for_backward, so saved-tensor hooks see what the recompute keeps.
    """

    @staticmethod
    def forward(ctx, fn, n_inputs: int, *tensors: torch.Tensor):
        ctx.fn, ctx.n_inputs, ctx.params = fn, n_inputs, tensors[n_inputs:]
        device = tensors[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*tensors[:n_inputs])
        with torch.no_grad():
            return fn(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        wrt = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        return (None, None, *(next(grads) if t.requires_grad else None for t in (*inputs, *ctx.params)))


def recompute(fn, inputs, params) -> torch.Tensor:
    """fn(*inputs) whose intermediates are recomputed in backward instead of kept (inputs are kept)."""
    return _Recompute.apply(fn, len(inputs), *inputs, *params)


class RecomputedRMSNorm(RMSNorm):
    """RMSNorm that keeps only its input for backward (same outputs and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return recompute(super().forward, [x], [self.weight])


class RecomputedMLA(MLA):
    """MLA whose projections, RoPE and attention core are recomputed in backward from the block's
    normalized input; o_proj stays outside, with its input cached in E5M6 (decoding with a cache
    runs the plain path)."""

    def forward(self, x_BSD: torch.Tensor, rope, cache=None) -> torch.Tensor:
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(x_BSD, rope, cache)
        inner = [p for name, p in self.named_parameters() if not name.startswith("o_proj.")]
        return self.o_proj(recompute(lambda x: self.attend(x, rope), [x_BSD], inner))


_FP8_CLASS = {nn.Linear: FP8Linear, MLP: FP8MLP, GroupedExperts: FP8GroupedExperts,
              RMSNorm: RecomputedRMSNorm, MLA: RecomputedMLA}
_RECOMPUTED = (RecomputedRMSNorm, RecomputedMLA)
_FP8_CLASS.update({c: c for c in list(_FP8_CLASS.values())})


def _is_kept(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in KEPT_HIGH_PRECISION)


def apply_fp8(model: nn.Module, pow2_scales: bool = True) -> nn.Module:
    """Switch `model`'s linears and experts to FP8, its norms and MLAs to recomputation, in place
    (idempotent); returns the model.

    `pow2_scales` rounds every scale up to a power of 2, which makes the backward pass's 1x128 ->
    128x1 re-quantization of cached activations nearly lossless.
    """
    inside_swiglu = set()
    for name, module in model.named_modules():
        if id(module) in inside_swiglu or not isinstance(module, (nn.Linear, MLP, GroupedExperts, RMSNorm, MLA)):
            continue
        if isinstance(module, nn.Linear) and _is_kept(name):
            continue
        fp8_cls = _FP8_CLASS.get(type(module))
        if fp8_cls is None:
            raise TypeError(f"apply_fp8: {name} is a {type(module).__name__}, a subclass the FP8 recipe "
                            f"does not know; supported: nn.Linear, model.moe.MLP, model.moe.GroupedExperts, "
                            f"model.norm.RMSNorm, model.mla.MLA")
        if isinstance(module, nn.Linear) and module.bias is not None:
            raise ValueError(f"apply_fp8: {name} has a bias; the FP8 Linear supports bias-free linears only")
        module.__class__ = fp8_cls
        if fp8_cls in _RECOMPUTED:
            continue
        module.fp8_pow2 = pow2_scales
        if fp8_cls is FP8Linear:
            module.fp8_e5m6_cache = any(name.endswith(n) for n in E5M6_CACHED)
        else:
            inside_swiglu.update(id(m) for m in module.modules())
    return model


def fp8_modules(model: nn.Module) -> dict:
    """Names of the modules `apply_fp8` switched, by kind (for logging and tests)."""
    kinds = {"linear": FP8Linear, "mlp": FP8MLP, "experts": FP8GroupedExperts, "norm": RecomputedRMSNorm,
             "mla": RecomputedMLA}
    return {k: [n for n, m in model.named_modules() if isinstance(m, cls)] for k, cls in kinds.items()}
