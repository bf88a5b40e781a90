"""The DeepSeek-V3 network: embedding -> blocks -> final norm -> head, plus the MTP modules.

DeepSeek-V3 sections 2.1-2.2. Parameter names follow Hugging Face's DeepseekV3 layout (without the
`model.` prefix) so checkpoint conversion is a rename. Layers live in a ModuleDict keyed by their
global index so a pipeline stage that keeps a subset still has the same parameter names.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .head_loss import prediction_loss
from .init import init_module
from .mla import LatentKVCache
from .moe import (MoE, set_balance_loss_weight, stacked_expert_load,
                  update_router_biases)
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Transformer(nn.Module):
    fused_head_loss: bool = False
    """`lm_loss`'s default: head + cross-entropy without keeping logits (model/head_loss.py); the
    trainer sets it from `precision.fused_head_loss`."""

    def __init__(self, cfg: ModelConfig, seed: Optional[int] = None):
        """Declared under `torch.device("meta")` the model holds no memory and is not initialized
        (see `model.init.materialize`); otherwise `init_weights(seed=seed)`."""
        super().__init__()
        self.cfg = cfg
        # an explicit weight skips nn.Embedding's own init (init_weights draws it; on the meta device
        # its normal_ would load torch's Python decompositions, ~130 MB of host memory)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights(seed=seed)

    def init_weights(self, std: Optional[float] = None, seed: Optional[int] = None) -> None:
        """Normal(0, std) for every matrix (std = initializer_range, 0.006 in the report; the input
        embedding Normal(0, embed_init_std) when set, `model.init.embedding_std`), ones for norms,
        each parameter from its own generator seeded by (seed, name[, expert]) (`model/init.py`), so
        any layout that materializes a part of the model gets the same values. `seed` defaults to a
        draw from torch's global generator (`torch.manual_seed` then `Transformer(cfg)` is reproducible)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        init_module(self, "", seed, self.cfg.initializer_range if std is None else std, self.cfg.embed_init_std)

    def forward(self, tokens_BS: torch.Tensor, *, cache: Optional[LatentKVCache] = None,
                return_mtp: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Logits [B, S, V]. With `return_mtp`, also a list of D tensors: entry k-1 holds
        [B, S-k, V] logits where position i predicts token i+k+1."""
        h, emb = self.trunk(tokens_BS, cache=cache)
        logits = self.lm_head(self.norm(h))
        if not return_mtp:
            return logits
        return logits, [self.lm_head(x) for x in mtp_head_inputs(self, h, emb[:, 1:])]

    def hidden_states(self, tokens_BS: torch.Tensor, *, cache: Optional[LatentKVCache] = None) -> torch.Tensor:
        """What the head reads: the final norm of the trunk's last hidden states, [B, S, D]. Scoring
        goes through `model.head_loss.head_logprobs` with it, never through [B, S, V] logits."""
        return self.norm(self.trunk(tokens_BS, cache=cache)[0])

    def trunk(self, tokens_BS: torch.Tensor, *,
              cache: Optional[LatentKVCache] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embedding and blocks: (last hidden states [B, S, D] before the final norm, embeddings)."""
        S = tokens_BS.shape[1]
        start = cache.length() if cache is not None else 0
        emb = self.embed_tokens(tokens_BS)
        rope = self.rotary(S, start)
        h = emb
        for block in self.layers.values():
            h = block(h, rope, cache)
        return h, emb

    def moe_layers(self) -> List[MoE]:
        """Every MoE layer, main blocks first, then the MTP blocks."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update: [n_moe_layers, n_routed_experts]."""
        return stacked_expert_load(self.moe_layers(), self.embed_tokens.weight.device)

    def update_router_bias(self, gamma: float, load_LE: Optional[torch.Tensor] = None) -> None:
        """Bias update of auxiliary-loss-free balancing for every router (resets the load counters)."""
        update_router_biases(self.moe_layers(), gamma, load_LE)

    def set_balance_loss_weight(self, weight: float) -> None:
        """Gradient weight of the sequence-wise balance loss (alpha / gradient accumulation steps)."""
        set_balance_loss_weight(self.moe_layers(), weight)

    def balance_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the last training forward's sequence balance loss (detached)."""
        layers = self.moe_layers()
        return torch.stack([m.last_balance_loss for m in layers]).sum() if layers else torch.zeros(())


def maxvio_per_layer(load_LE: torch.Tensor) -> torch.Tensor:
    """max_load / mean_load - 1 of each layer (row) of `load_LE` [L, E] (the report's MaxVio, section 2.1.2)."""
    mean = load_LE.float().mean(dim=1).clamp_min(1e-9)
    return load_LE.float().max(dim=1).values / mean - 1


def maxvio(load_LE: torch.Tensor) -> float:
    """Max over layers of max_load / mean_load - 1 (the report's MaxVio, section 2.1.2)."""
    if load_LE.numel() == 0:
        return 0.0
    return float(maxvio_per_layer(load_LE).max())


def mtp_head_inputs(parts: nn.Module, h_BSD: torch.Tensor,
                    emb_next_BSD: Optional[torch.Tensor]) -> Iterator[torch.Tensor]:
    """For each MTP depth k, lazily: what the head is applied to, [B, S-k, D] (after the module's own
    norm). `parts` has the Transformer's `mtp` and `rotary` (the model, or its last pipeline stage);
    h: the trunk's last hidden states; emb_next: the embeddings of input tokens 1..S-1 (unused, may
    be None, without MTP modules or when S = 1)."""
    S, prev = h_BSD.shape[1], h_BSD
    for k, module in enumerate(parts.mtp, start=1):
        if S - k <= 0:
            return
        prev = module(prev[:, :-1], emb_next_BSD[:, k - 1:], parts.rotary(S - k))
        yield module.norm(prev)


def next_token_losses(parts: nn.Module, h_BSD: torch.Tensor, emb_next_BSD: Optional[torch.Tensor],
                      labels_BS: torch.Tensor, fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(main CE, mean over depths of the MTP CE, 0 without MTP) from the trunk's last hidden states;
    `parts` has the Transformer's `norm`, `lm_head`, `mtp` and `rotary` (see `mtp_head_inputs`).
    The main loss comes first, then each depth's (the order `lm_loss` and a pipeline's last stage share).
    Without gradient (validation) the head always runs chunk by chunk: no [B, S, V] logits."""
    fused = fused or not torch.is_grad_enabled()
    loss = prediction_loss(parts.norm(h_BSD), parts.lm_head, labels_BS, fused)
    mtp_losses = [prediction_loss(hk, parts.lm_head, labels_BS[:, k:], fused)
                  for k, hk in enumerate(mtp_head_inputs(parts, h_BSD, emb_next_BSD), start=1)]
    return loss, torch.stack(mtp_losses).mean() if mtp_losses else loss.new_zeros(())


def lm_loss(model: Transformer, tokens_BT: torch.Tensor, *,
            fused_head_loss: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Cross-entropy of next-token prediction on tokens[:, :-1] -> tokens[:, 1:], and the mean MTP loss.

    Returns {"loss": main CE, "mtp_loss": mean over depths of the MTP CE (0 without MTP)}. Labels equal
    to -100 are ignored, as by F.cross_entropy. `fused_head_loss` (default `model.fused_head_loss`)
    computes head and cross-entropy chunk by chunk without keeping the logits for backward
    (model/head_loss.py: same loss and gradients to rounding, one more head GEMM; `lm_head`'s own
    forward and hooks are then not called).
    """
    inputs, labels = tokens_BT[:, :-1], tokens_BT[:, 1:]
    fused = model.fused_head_loss if fused_head_loss is None else fused_head_loss
    h, emb = model.trunk(inputs)
    loss, mtp_loss = next_token_losses(model, h, emb[:, 1:], labels, fused)
    return {"loss": loss, "mtp_loss": mtp_loss}
