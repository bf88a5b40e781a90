"""Output head + cross-entropy that keeps no logits for backward (activation-memory saving).

The plain path, `F.cross_entropy(F.linear(h, W).float(), labels)`, keeps for backward the head's
[N, V] logits, their fp32 copy and the log-softmax output: ~10 bytes per token and vocabulary entry,
more than all the Transformer blocks of a small model under the FP8 recipe. `head_cross_entropy`
computes the same loss chunk by chunk over the tokens and keeps only the head's input (in the head's
compute dtype) and the labels; backward recomputes each chunk's logits and log-softmax and forms
(softmax - one-hot) x (dloss / tokens) directly. Cost: the head GEMM runs once more, in backward.

It serves the memory goal of DeepSeek-V3 section 3.2.3 (recompute cheap parts instead of storing
them) for the part the FP8 recipe keeps in high precision (section 3.3.1: the output head); the
chunked recomputation of logits is the idea of Cut Cross-Entropy (Wijmans et al., 2024), here with
each chunk's logits materialized by ordinary GEMMs instead of a fused kernel.

`head_logprobs` is the forward alone, without gradient, for validation and evaluation: per-token
log-probabilities and greedy flags, one chunk of logits at a time.

Numerics are the plain path's: logits from a GEMM in the compute dtype (the autocast dtype under
autocast, else the input dtype), log-softmax in fp32 by the same kernel (so the logits' gradient is
the plain path's bit for bit, given the same logits), mean over the tokens whose label is not
`ignore_index`, the logits' gradient cast to the compute dtype before the two backward GEMMs. The
head-weight gradients of several chunks, and of several calls (main and MTP heads), are summed in
fp32; the plain path under autocast rounds each GEMM's, and the sum over heads, to bf16.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 25
"""Default chunk: as many tokens as keep one chunk's logits at <= 2^25 elements (128 MiB in fp32)."""


def compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(h, weight)` computes in: the autocast dtype when autocast applies, else h's."""
    device = h.device.type
    if torch.is_autocast_enabled(device) and h.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    if h.dtype != weight.dtype:
        raise TypeError(f"head_cross_entropy: hidden states are {h.dtype} and the head weight {weight.dtype}; "
                        f"outside autocast both must have the same dtype (as for F.linear)")
    return h.dtype


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean CE of (h_ND @ w_VD^T) over the valid labels; saves h (in the compute dtype) and the labels."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, ignore_index: int, chunk: int, dtype: torch.dtype):
        with torch.autocast(h_ND.device.type, enabled=False):
            x, w = h_ND.to(dtype), w_VD.to(dtype)
            valid = labels_N != ignore_index
            target = torch.where(valid, labels_N, 0).unsqueeze(1)
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            for s in range(0, x.shape[0], chunk):
                logp = torch.log_softmax((x[s:s + chunk] @ w.t()).float(), dim=1)
                nll = -logp.gather(1, target[s:s + chunk]).squeeze(1)
                total += torch.where(valid[s:s + chunk], nll, 0).sum()
            count = valid.sum()
        ctx.chunk, ctx.ignore_index, ctx.h_dtype = chunk, ignore_index, h_ND.dtype
        ctx.save_for_backward(x, w_VD, labels_N, count)
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w_VD, labels_N, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        chunk = ctx.chunk
        with torch.autocast(x.device.type, enabled=False):
            w = w_VD.to(x.dtype)
            valid = labels_N != ctx.ignore_index
            target = torch.where(valid, labels_N, 0).unsqueeze(1)
            scale_N = torch.where(valid, grad.float() / count, 0).unsqueeze(1)
            dx = torch.empty_like(x) if need_h else None
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for s in range(0, x.shape[0], chunk):
                x_c, scale = x[s:s + chunk], scale_N[s:s + chunk]
                d = torch.log_softmax((x_c @ w.t()).float(), dim=1).exp_() * scale
                d.scatter_add_(1, target[s:s + chunk], -scale)
                d = d.to(x.dtype)
                if need_h:
                    dx[s:s + chunk] = d @ w
                if need_w:
                    dw += (d.t() @ x_c).float()
        return (dx.to(ctx.h_dtype) if need_h else None, dw.to(w_VD.dtype) if need_w else None,
                None, None, None, None)


def head_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, *,
                       ignore_index: int = -100, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `h_ND @ weight_VD^T` against `labels_N`, fp32 scalar, without
    keeping the logits for backward (same value and gradients as the plain path, see module doc).

    Tokens whose label is `ignore_index` count neither in the sum nor in the mean (NaN if all are).
    `chunk_tokens`: tokens per chunk (default: CHUNK_ELEMENTS // vocabulary size, at least 1).
    """
    if h_ND.ndim != 2 or weight_VD.ndim != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"head_cross_entropy: expected hidden [N, D] and weight [V, D], got "
                         f"{tuple(h_ND.shape)} and {tuple(weight_VD.shape)}")
    if labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"head_cross_entropy: labels {tuple(labels_N.shape)} do not match {h_ND.shape[0]} tokens")
    chunk = max(1, CHUNK_ELEMENTS // weight_VD.shape[0]) if chunk_tokens is None else chunk_tokens
    if chunk < 1:
        raise ValueError(f"head_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    return _HeadCrossEntropy.apply(h_ND, weight_VD, labels_N, ignore_index, chunk,
                                   compute_dtype(h_ND, weight_VD))


def prediction_loss(h_BSD: torch.Tensor, lm_head: nn.Linear, labels_BS: torch.Tensor, fused: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of `lm_head(h)` against `labels` (fp32 scalar): through
    `head_cross_entropy` when `fused`, else the plain path (logits kept for backward)."""
    if fused:
        return head_cross_entropy(h_BSD.flatten(0, 1), lm_head.weight, labels_BS.flatten())
    return F.cross_entropy(lm_head(h_BSD).flatten(0, 1).float(), labels_BS.flatten())


@torch.no_grad()
def head_logprobs(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, *,
                  chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-probability [N] fp32 of each label under softmax(h @ weight^T), whether the label is the
    argmax [N] bool), computed chunk by chunk as `head_cross_entropy` does, so that no more than one
    chunk of logits ever exists: what validation and evaluation use instead of [B, S, V] logits.
    Logits in the compute dtype (the autocast dtype under autocast, else h's), log-softmax in fp32."""
    if h_ND.ndim != 2 or weight_VD.ndim != 2 or h_ND.shape[1] != weight_VD.shape[1] or labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"head_logprobs: expected hidden [N, D], weight [V, D] and labels [N], got "
                         f"{tuple(h_ND.shape)}, {tuple(weight_VD.shape)} and {tuple(labels_N.shape)}")
    chunk = max(1, CHUNK_ELEMENTS // weight_VD.shape[0]) if chunk_tokens is None else chunk_tokens
    dtype = compute_dtype(h_ND, weight_VD)
    logprob_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
    greedy_N = torch.empty(h_ND.shape[0], dtype=torch.bool, device=h_ND.device)
    with torch.autocast(h_ND.device.type, enabled=False):
        x, w = h_ND.to(dtype), weight_VD.to(dtype)
        for s in range(0, x.shape[0], chunk):
            logp = torch.log_softmax((x[s:s + chunk] @ w.t()).float(), dim=1)
            target = labels_N[s:s + chunk].unsqueeze(1)
            logprob_N[s:s + chunk] = logp.gather(1, target).squeeze(1)
            greedy_N[s:s + chunk] = logp.argmax(dim=1) == target.squeeze(1)
    return logprob_N, greedy_N
