"""Multi-Token Prediction modules (DeepSeek-V3 section 2.2, eq. 21-25).

Module k (k = 1..D) combines the hidden state of depth k-1 at position i with the embedding of
token i+k, h'_k = eh_proj([RMSNorm(emb(t_{i+k})); RMSNorm(h_{k-1})]) (embedding first, as in the
released checkpoint), runs one Transformer block and predicts token i+k+1 through the shared
output head after its own final norm. Embedding and head are the main model's (shared).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev_BSD: torch.Tensor, emb_BSD: torch.Tensor,
                rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Hidden state of this depth (before `self.norm`) for the positions of `h_prev_BSD`."""
        h = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_prev_BSD)], dim=-1))
        return self.block(h, rope)
