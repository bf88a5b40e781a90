"""One Transformer block: RMSNorm -> MLA -> residual -> RMSNorm -> dense SwiGLU or MoE -> residual."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .mla import MLA, LatentKVCache
from .moe import MLP, MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
                cache: Optional[LatentKVCache] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
