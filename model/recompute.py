"""Activation recomputation: run a function keeping only its inputs, re-run it in backward.

DeepSeek-V3 section 3.2.3 recomputes all RMSNorm operations and the MLA up-projections during
back-propagation instead of storing their outputs. `recompute(fn, inputs, params)` is that
mechanism; model/fp8.py (the recipe `precision=fp8` trains with) and the router (model/moe.py) use it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from kernels.linear import backward_phase


class _Recompute(torch.autograd.Function):
    """fn(*inputs) keeping only `inputs` for backward, which re-runs fn under the same autocast state.

    Inputs are saved with save_for_backward, so saved-tensor hooks see what the recompute keeps.
    Backward back-propagates through the recomputed graph once and accumulates the gradients of
    `params` right there, as torch.utils.checkpoint's reentrant variant does: `.grad` and gradient
    hooks (e.g. fp32 accumulation of bf16 parameters) see each exactly once, and the parameters are
    not inputs of this node, so the zero-bubble pipeline schedules' weight phase never calls it again
    (no second recompute, `kernels.linear.backward_phase`). Use `.backward()`, not
    `torch.autograd.grad`, to get the parameters' gradients.
    """

    @staticmethod
    def forward(ctx, fn, params, *inputs: torch.Tensor):
        ctx.fn, ctx.params = fn, params
        device = inputs[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        wrt = [t for t in (*inputs, *ctx.params) if t.requires_grad]
        with backward_phase("full"):
            torch.autograd.backward(out, grad, inputs=wrt)
        return (None, None, *(t.grad for t in inputs))


def recompute(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor]) -> torch.Tensor:
    """fn(*inputs) whose intermediates are recomputed in backward instead of kept (inputs are kept).
    `params`: every parameter fn reads; backward accumulates their gradients into `.grad`. With no
    input requiring grad there is nothing to recompute for: fn runs under plain autograd."""
    if not any(t.requires_grad for t in inputs):
        return fn(*inputs)
    return _Recompute.apply(fn, tuple(params), *inputs)
