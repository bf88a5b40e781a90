"""Log-likelihood scoring shared by evaluation and the trainer's validation.

Bits per byte (DeepSeek-V3 section 4.4: Pile-test is reported in BPB so that models with different
tokenizers compare): BPB = sum of token NLL in nats / (ln 2 * number of UTF-8 bytes of the text).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_nll(model: torch.nn.Module, tokens_BT: torch.Tensor) -> torch.Tensor:
    """NLL in nats (fp32) of tokens[:, 1:] given their prefixes: [B, T-1]."""
    logits = model(tokens_BT[:, :-1]).float()
    return F.cross_entropy(logits.transpose(1, 2), tokens_BT[:, 1:], reduction="none")


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total NLL in nats over a text of `n_bytes` UTF-8 bytes -> bits per byte."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return nll_nats / (math.log(2) * n_bytes)
