"""Bytes the network keeps for backward per token and layer: the one place for the activation formula.

DeepSeek-V3 sections 3.2.3 (recomputation of RMSNorm and the MLA up-projections) and 3.3 (FP8
caching of activations). This module knows the network only; how layers, micro-batches and
parameters spread over GPUs is parallel/memory.py, which adds this per-token figure up over the
layers and micro-batches a pipeline rank holds.

Element sizes (bytes): r = the residual stream, which has the parameters' dtype (4 B with fp32
parameters: the embedding output is fp32 and autocast only casts GEMM inputs, so the residual adds
stay fp32; 2 B with `precision.param_dtype=bf16`); h = a bf16 activation (the autocast dtype; 4 B
under fp32); f = an FP8-cached element (1 B under fp8, h otherwise) plus s = 4/128 B of fp32 scale
per element under fp8; e = 1.5 B for o_proj's E5M6-cached input under fp8, else h.

What the FP8 recipe keeps (model/fp8.py): each sublayer's RMSNorm is recomputed together with what
reads it, so only its input, the residual stream, is kept: MLA recomputes norm, projections, RoPE
and attention core from it, and the router recomputes norm and gate GEMM from it (the routed and
shared experts keep their inputs in FP8); o_proj's input is kept in E5M6, expert inputs and
SwiGLU inputs in FP8, the SwiGLU output is recomputed:

    attention:   D r (norm input)  +  H v_head_dim e + 4  (o_proj input, its scale)
    dense MLP:   D r (norm input)  +  (D + 2 I) (f + s)   (FP8 input and SwiGLU input)
    MoE:         D r (norm input, shared by the router's recompute)  +  4 E (fp32 scores)
                 + k ((D + 2 I_moe) (f + s) + 32)   routed experts: input and SwiGLU input, plus per
                                    (token, expert) pair the fp32 gate weight (applied before the
                                    down projection, so no output is kept), the int64 expert index
                                    and the two int64 permutation indices
                 + n_shared (D + 2 I_moe) (f + s)   shared experts

Without the recipe (precision=bf16/fp32) the model recomputes nothing: the formula is then a lower
bound. An MTP module's block has an r = h residual stream (it starts at eh_proj's output, in the
autocast dtype); the module adds 2 D r for its enorm/hnorm inputs and 2 D (f + s) for eh_proj's
input. The head keeps, per token and prediction, 6 V B (bf16 logits and their fp32 copy for the
cross-entropy), or with `fused_head_loss` (model/head_loss.py) only its input and the label, D h + 8.
"""
from __future__ import annotations

from typing import Dict

from .config import ModelConfig

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp8")
PARAM_DTYPES = {"fp32": 4, "bf16": 2}
"""`precision.param_dtype` -> bytes per parameter element (and per residual-stream element)."""


def element_bytes(precision: str, param_dtype: str = "fp32") -> Dict[str, float]:
    """{"r": residual stream element, "h": a bf16 activation (4 B under fp32), "f": an FP8-cached
    element with its share of the 1x128 scale (bf16 / fp32 when not fp8), "e": o_proj's cached input
    (E5M6 under fp8)}."""
    h = 4 if precision == "fp32" else 2
    return {"r": 4 if precision == "fp32" else PARAM_DTYPES[param_dtype], "h": h,
            "f": {"fp32": 4, "bf16": 2, "fp8": 1 + 4 / 128}[precision], "e": 1.5 if precision == "fp8" else h}


def activation_bytes_per_token(cfg: ModelConfig, layer_idx: int, precision: str, param_dtype: str = "fp32") -> float:
    """Bytes kept for backward per token by block `layer_idx` (formula in the module docstring)."""
    b = element_bytes(precision, param_dtype)
    r, f, e = b["r"], b["f"], b["e"]
    if layer_idx >= cfg.num_hidden_layers:  # an MTP block: its stream starts at eh_proj's output
        r = b["h"]
    D = cfg.hidden_size
    attn = D * r + cfg.num_attention_heads * cfg.v_head_dim * e + 4
    if not cfg.is_moe_layer(layer_idx):
        return attn + D * r + (D + 2 * cfg.intermediate_size) * f
    I = cfg.moe_intermediate_size
    moe = D * r + 4 * cfg.n_routed_experts
    moe += cfg.num_experts_per_tok * ((D + 2 * I) * f + 32)
    moe += cfg.n_shared_experts * (D + 2 * I) * f
    return attn + moe


def mtp_projection_bytes_per_token(cfg: ModelConfig, precision: str, param_dtype: str = "fp32") -> float:
    """What an MTP module keeps besides its block: enorm and hnorm inputs and eh_proj's input."""
    b = element_bytes(precision, param_dtype)
    return 2 * cfg.hidden_size * (b["r"] + b["f"])


def head_bytes_per_token(cfg: ModelConfig, precision: str, fused_head_loss: bool) -> float:
    """What one prediction head (main or MTP) keeps per token: logits and their fp32 copy, or with
    the fused head loss only its input and the label."""
    return cfg.hidden_size * element_bytes(precision)["h"] + 8 if fused_head_loss else 6 * cfg.vocab_size
