"""Activation recomputation: run a function keeping only its inputs, re-run it in backward.

DeepSeek-V3 section 3.2.3 recomputes all RMSNorm operations and the MLA up-projections during
back-propagation instead of storing their outputs. `recompute(fn, inputs, params)` is that
mechanism; model/fp8.py (the recipe `precision=fp8` trains with) and the router (model/moe.py) use it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


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


def recompute(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor]) -> torch.Tensor:
    """fn(*inputs) whose intermediates are recomputed in backward instead of kept (inputs are kept).
    `params`: every parameter fn reads, so that they receive their gradients."""
    return _Recompute.apply(fn, len(inputs), *inputs, *params)
