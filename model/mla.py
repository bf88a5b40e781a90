"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

q = W_qb(RMSNorm(W_qa x)) (or W_q x without q-LoRA); [c_kv, k_rope] = W_kva x;
[k_nope, v] = W_kvb(RMSNorm(c_kv)); RoPE on the rope part only, k_rope shared by all heads.
Only (c_kv, k_rope) are cached during generation: MLA's compressed KV cache; decoding steps attend
to it directly, with the key/value up-projections absorbed into query and output. On CUDA the values
are zero-padded to the query/key head dim so that SDPA can run flash attention (`attention`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


class LatentKVCache:
    """Per-layer compressed cache: normalized c_kv [B, T, kv_lora_rank] and roped k_rope [B, T, R]."""

    def __init__(self) -> None:
        self.c_kv: dict = {}
        self.k_rope: dict = {}

    def length(self, layer: int = 0) -> int:
        return self.c_kv[layer].shape[1] if layer in self.c_kv else 0

    def update(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer in self.c_kv:
            c_kv = torch.cat([self.c_kv[layer], c_kv], dim=1)
            k_rope = torch.cat([self.k_rope[layer], k_rope], dim=1)
        self.c_kv[layer], self.k_rope[layer] = c_kv, k_rope
        return c_kv, k_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.softmax_scale = cfg.softmax_scale

    def forward(self, x_BSD: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
                cache: Optional[LatentKVCache] = None) -> torch.Tensor:
        return self.o_proj(self.attend(x_BSD, rope, cache))

    def attend(self, x_BSD: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
               cache: Optional[LatentKVCache] = None) -> torch.Tensor:
        """Everything before o_proj: projections, RoPE and attention -> [B, S, n_heads * v_head_dim]."""
        B, S, _ = x_BSD.shape
        cos, sin = rope
        if self.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rope = q.view(B, S, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        start = 0
        if cache is not None:
            start = cache.length(self.layer_idx)
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, k_rope)
            if start > 0:
                out = self.absorbed_attention(q_nope, q_rope, c_kv, k_rope, start)
                return out.reshape(B, S, -1)
        T = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)

        q_BHSE = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k_BHTE = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        v_BHTE = v.transpose(1, 2)
        out = attention(q_BHSE, k_BHTE, v_BHTE, self.softmax_scale, start)
        return out.transpose(1, 2).reshape(B, S, -1)

    def absorbed_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                           k_rope: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of S new queries on the latent cache without expanding it to per-head keys and
        values (DeepSeek-V2 section 2.1.2): W_UK folds into the query, W_UV into the output. Same
        result as the expanded path; used for decoding steps. Returns [B, S, H, v_dim]."""
        w_HOR = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_HOR.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
        scores = (torch.einsum("bshr,btr->bhst", q_latent, c_kv)
                  + torch.einsum("bshe,bte->bhst", q_rope, k_rope)).float() * self.softmax_scale
        S, T = scores.shape[-2:]
        visible = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril(diagonal=start)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(c_kv.dtype)
        out_latent = torch.einsum("bhst,btr->bshr", probs, c_kv)
        return torch.einsum("bshr,hvr->bshv", out_latent, w_uv)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int,
              pad_v: Optional[bool] = None) -> torch.Tensor:
    """Causal softmax attention; query i sits at absolute position start + i of the keys.

    MLA's values are narrower than its queries and keys (128 vs 192 in DeepSeek-V3), and SDPA's flash
    attention kernels need one head dim for all three. `pad_v` (default: on CUDA, where flash
    attention is the fast kernel) zero-pads v to the q/k head dim and drops the padded output columns:
    the same result, since output column j only ever reads value column j."""
    dv = v.shape[-1]
    if (q.is_cuda if pad_v is None else pad_v) and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    S, T = q.shape[2], k.shape[2]
    if start == 0 and S == T:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[..., :dv] if out.shape[-1] != dv else out
