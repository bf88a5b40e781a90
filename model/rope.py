"""Rotary position embedding for MLA's decoupled key/query part, with YaRN context extension.

DeepSeek-V2 section 2.1.3 (decoupled RoPE) and DeepSeek-V3 section 4.3 (YaRN). Pairs are
interleaved, (x0, x1), (x2, x3), ..., each pair rotated by one frequency, as in DeepSeek's weights.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] (fp32, on the CPU even under a meta default device: they are
    tiny, and computing them on meta would load torch's Python decompositions) and the cos/sin
    magnitude (YaRN attention factor)."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0
    factor = float(yarn["factor"])
    original = int(yarn.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        magnitude = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    else:
        magnitude = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, float(magnitude)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) [S, rope_dim/2] in fp32 for positions start .. start+S-1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, magnitude = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.magnitude = magnitude
        self._cache: Optional[Tuple[int, torch.device, torch.Tensor, torch.Tensor]] = None

    def forward(self, seq_len: int, start: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        end = start + seq_len
        cache = self._cache
        if cache is None or cache[0] < end or cache[1] != self.inv_freq.device:
            length = max(end, 2 * (cache[0] if cache else 0))
            pos = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
            angles = torch.outer(pos, self.inv_freq.float())
            cache = (length, self.inv_freq.device, angles.cos() * self.magnitude, angles.sin() * self.magnitude)
            self._cache = cache
        return cache[2][start:end], cache[3][start:end]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, R] by cos/sin [S, R/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
