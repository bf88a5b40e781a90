"""RMSNorm computed in fp32 (kept in high precision by the FP8 recipe, report section 3.3).

The output is in the input's dtype (weight * normalized input, as DeepSeek's and Hugging Face's
implementations compute it), then, under autocast, in the autocast dtype: everything that reads a
norm's output (the linears, the FP8 quantizers, the router, which upcasts to fp32 itself) takes it
in that dtype anyway, and whatever keeps it for backward keeps half the bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return y.to(torch.get_autocast_dtype(device))
        return y
