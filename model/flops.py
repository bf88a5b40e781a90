"""Parameter counts and training FLOPs per token of a DeepSeek-V3-style model: the one place for both.

Conventions (those of the DeepSeek papers, checked against their published figures):
- `total_params`: every trainable parameter of the main model, including the input embedding and
  the output head (once if tied), excluding the MTP modules. DeepSeek-V3: 671.03B ("671B").
- `active_params`: parameters a token passes through: all dense parts, the shared expert(s), the
  router and the `num_experts_per_tok` routed experts of each MoE layer, the head; the input
  embedding is a table lookup and is not counted (this is how DeepSeek reports "activated"
  parameters: it gives 2.45B for V2-Lite's published "2.4B", 20.9B for V2's "21B" and 36.6B for
  V3's "37B"; with the embedding counted the three would be 2.7B, 21.4B and 37.6B).
- `mtp_params`: the MTP modules' own parameters (they share the main embedding and head). DeepSeek's
  released checkpoint stores a copy of embedding and head with each module, which is why it
  reports 14B for its MTP module (11.6B + 2 x 0.93B) and 685B in all.
- `embedding_params`: the vocabulary matrices: input embedding + output head (once if tied).
- The router bias `e_score_correction_bias` is a buffer, not a parameter: it is not counted.

`flops_per_token(cfg, seq_len)`: forward + backward training FLOPs per token,

    6 * matmul_active_params  +  6 * n_layers * seq_len * heads * (qk_head_dim + v_head_dim) / 2

where matmul_active_params = active_params without norm weights (every active weight matrix,
router and head included: 2 FLOPs per multiply-add in the forward pass, twice that in the
backward pass), and the second term is causal attention: QK^T and PV, 2 FLOPs per multiply-add
over on average seq_len / 2 keys, times 3 for forward + backward. When
`num_nextn_predict_layers` > 0 each MTP module adds its own matmuls (eh_proj, its block's active
weights and another pass through the shared head) and one layer's attention term: MTP is part of
every training step, so MFU counts it.
"""
from __future__ import annotations

from typing import Dict

from .config import ModelConfig


def attention_params(cfg: ModelConfig) -> Dict[str, int]:
    """MLA parameters of one layer: {"matmul": weight matrices, "norm": norm weights}."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q_matmul, q_norm = D * H * cfg.qk_head_dim, 0
    else:
        q_matmul, q_norm = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim, cfg.q_lora_rank
    kv_matmul = (D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                 + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    out_matmul = H * cfg.v_head_dim * D
    return {"matmul": q_matmul + kv_matmul + out_matmul, "norm": q_norm + cfg.kv_lora_rank}


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert (SwiGLU: gate, up, down)."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def ffn_params(cfg: ModelConfig, layer_idx: int) -> Dict[str, int]:
    """Feed-forward part of block `layer_idx`: {"total", "active"} (all matmul weights)."""
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer_idx):
        dense = 3 * D * cfg.intermediate_size
        return {"total": dense, "active": dense}
    shared = cfg.n_shared_experts * expert_params(cfg)
    router = cfg.n_routed_experts * D
    return {"total": shared + router + cfg.n_routed_experts * expert_params(cfg),
            "active": shared + router + cfg.num_experts_per_tok * expert_params(cfg)}


def block_params(cfg: ModelConfig, layer_idx: int) -> Dict[str, int]:
    """One Transformer block: {"total", "active", "matmul_active"}."""
    attn, ffn = attention_params(cfg), ffn_params(cfg, layer_idx)
    norms = attn["norm"] + 2 * cfg.hidden_size
    return {"total": attn["matmul"] + norms + ffn["total"],
            "active": attn["matmul"] + norms + ffn["active"],
            "matmul_active": attn["matmul"] + ffn["active"]}


def mtp_module_params(cfg: ModelConfig, k: int) -> Dict[str, int]:
    """MTP module k (0-based): enorm, hnorm, eh_proj, block, final norm (embedding and head shared)."""
    D = cfg.hidden_size
    block = block_params(cfg, cfg.num_hidden_layers + k)
    eh_proj = 2 * D * D
    return {"total": 3 * D + eh_proj + block["total"],
            "matmul_active": eh_proj + block["matmul_active"]}


def param_counts(cfg: ModelConfig) -> Dict[str, int]:
    """{"total_params", "active_params", "mtp_params", "embedding_params"}; see the module docstring."""
    D, V = cfg.hidden_size, cfg.vocab_size
    blocks = [block_params(cfg, i) for i in range(cfg.num_hidden_layers)]
    head = V * D
    embedding = V * D if not cfg.tie_word_embeddings else 0
    total = embedding + head + D + sum(b["total"] for b in blocks)
    active = head + D + sum(b["active"] for b in blocks)
    mtp = sum(mtp_module_params(cfg, k)["total"] for k in range(cfg.num_nextn_predict_layers))
    return {"total_params": total, "active_params": active, "mtp_params": mtp,
            "embedding_params": embedding + head}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward training FLOPs per token at `seq_len`, MTP modules included (module docstring)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    head = cfg.vocab_size * cfg.hidden_size
    matmul = head + sum(block_params(cfg, i)["matmul_active"] for i in range(cfg.num_hidden_layers))
    depth = cfg.num_hidden_layers
    for k in range(cfg.num_nextn_predict_layers):
        matmul += mtp_module_params(cfg, k)["matmul_active"] + head
        depth += 1
    attn = 6 * depth * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return float(6 * matmul + attn)
