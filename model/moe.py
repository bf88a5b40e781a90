"""DeepSeekMoE: 1 shared + N routed SwiGLU experts behind a sigmoid, group-limited top-k router.

DeepSeek-V3 section 2.1.2: s = sigmoid(x W^T) in fp32; the per-expert bias b (auxiliary-loss-free
balancing, eq. 16) is added for *selection only*; a token may only pick experts from the
`topk_group` best groups (a group = one node's experts, so "at most M nodes per token"); gate
weights are the unbiased scores of the selected experts, normalized, times `routed_scaling_factor`.
The complementary sequence-wise balance loss (eq. 17-20) is attached to the layer output so its
gradient flows without the caller having to add it to the loss.

The layer never moves tokens itself: it hands them to a *dispatcher* (local by default; `parallel/`
supplies the expert-parallel ones) together with the experts module. A dispatcher's `start(x_TD,
topk_idx_TK, topk_weight_TK, experts)` sends the tokens and returns a flight whose `wait()` gives the
routed output y_TD; the layer runs the shared expert in between, while the tokens travel (section
3.2.1: computation overlapped with the all-to-all).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import ModelConfig
from .norm import RMSNorm
from .recompute import recompute


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


_WEIGHT_CASTS = WeakIdKeyDictionary()


def autocast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`, cast once while any copy is alive, as autocast's cache does for the ops it knows.

    A parameter's cast is remembered weakly (with the parameter's version): every micro-batch in flight
    (a pipeline schedule runs several forwards before their backwards) shares the one copy that the
    first forward saved for backward, instead of saving a copy each. It is freed with the last graph
    that uses it; an in-place update of the parameter makes it stale."""
    if not (w.is_leaf and w.requires_grad and torch.is_autocast_cache_enabled()) or w.dtype == dtype:
        return w.to(dtype)
    hit = _WEIGHT_CASTS.get(w)
    cast = hit[2]() if hit is not None and hit[:2] == (w._version, dtype) else None
    if cast is None:
        cast = w.to(dtype)
        _WEIGHT_CASTS[w] = (w._version, dtype, weakref.ref(cast))
    return cast


def grouped_linear(x_ND: torch.Tensor, w_EOD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, counts_E rows per expert: row n of expert e -> x[n] @ w[e]^T.

    Autocast has no rule for grouped GEMMs, so under autocast both operands are cast here (the
    weight through `autocast_weight`, shared by the micro-batches in flight). In fp64 (reference
    computations: torch's grouped GEMM has none) one GEMM per expert.
    """
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type)
        x_ND, w_EOD = x_ND.to(dtype), autocast_weight(w_EOD, dtype)
    if x_ND.shape[0] == 0:
        return x_ND.new_zeros(0, w_EOD.shape[1])
    if x_ND.dtype == torch.float64:
        return torch.cat([x @ w.T for x, w in zip(x_ND.split(counts_E.tolist()), w_EOD)])
    offsets = torch.cumsum(counts_E, 0).to(torch.int32)
    return torch._grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs=offsets)


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored as stacked weights, run as grouped GEMMs.

    gate_up_proj [E, 2I, D] holds gate (first I rows) and up projections; down_proj [E, D, I].
    Row i is the model's routed expert `expert_offset + i` (an expert-parallel rank holds a slice).
    """

    expert_offset: int = 0
    takes_fp8_input: bool = False  # True: forward also accepts `x_fp8`, its input already quantized

    def __init__(self, num_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.num_experts, self.dim, self.inter_dim = num_experts, dim, inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor,
                row_weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row n -> expert(x[n]), times row_weight_N[n] when given (applied to the SwiGLU output
        before the down projection: the same product, but backward keeps nothing of size D)."""
        gate, up = grouped_linear(x_ND, self.gate_up_proj, counts_E).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if row_weight_N is not None:
            hidden = hidden * row_weight_N.unsqueeze(1).to(hidden.dtype)
        return grouped_linear(hidden, self.down_proj, counts_E)


def count_per_expert(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int64 [n_experts]: how often each expert id occurs in idx (`bincount` without its host sync on CUDA)."""
    flat = idx.flatten().long()
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


class _LocalFlight:
    """A local dispatch "in flight": nothing travels; `wait()` runs the experts."""

    def __init__(self, dispatcher: "LocalDispatcher", *args):
        self.dispatcher, self.args = dispatcher, args

    def wait(self) -> torch.Tensor:
        return self.dispatcher(*self.args)


class LocalDispatcher:
    """Single-process dispatch: sort (token, expert) pairs by expert, run the experts with each pair's
    gate weight applied inside, and sum a token's K outputs in fp32. `start(...)` returns a flight
    whose `wait()` does it (the interface of the expert-parallel dispatchers)."""

    def start(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
              experts: GroupedExperts) -> _LocalFlight:
        return _LocalFlight(self, x_TD, topk_idx_TK, topk_weight_TK, experts)

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        flat_idx = topk_idx_TK.flatten()
        order = torch.argsort(flat_idx, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts_E = count_per_expert(flat_idx, experts.num_experts)
        weight_N = topk_weight_TK.flatten().index_select(0, order)
        y_sorted = experts(_RowsToExperts.apply(x_TD, order, inverse, K), counts_E, weight_N)
        y_TKD = _RowsFromExperts.apply(y_sorted, order, inverse).view(T, K, -1)
        return y_TKD.sum(dim=1, dtype=torch.float32).to(x_TD.dtype)


class _RowsToExperts(torch.autograd.Function):
    """Row n of the output is token order[n] // K: each token once per selected expert, sorted by expert.

    Backward gathers every copy's gradient through the inverse permutation and sums a token's K
    copies, which is cheaper on every device than autograd's scatter-add for indexing.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, K: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.K = K
        return x_TD.index_select(0, torch.div(order, K, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        inverse, = ctx.saved_tensors
        grad_TD = grad_ND.index_select(0, inverse).view(-1, ctx.K, grad_ND.shape[-1]).sum(dim=1)
        return grad_TD, None, None, None


class _RowsFromExperts(torch.autograd.Function):
    """Undoes the expert sort: output row i is input row inverse[i] (a permutation, so backward is a gather)."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return y_ND.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        order, = ctx.saved_tensors
        return grad_ND.index_select(0, order), None, None


class _Fp32Linear(torch.autograd.Function):
    """x @ w^T in fp32 whatever x's dtype (the recipe keeps the gate in fp32), keeping x for backward
    in its own dtype rather than as an fp32 copy."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return x_TD.float() @ w_ED.float().t()

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        dx = (grad_TE @ w_ED.float()).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_TE.t() @ x_TD.float()).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Router(nn.Module):
    """Sigmoid gate with selection-only bias and group-limited top-k; tracks expert load."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.route_scale, self.norm_topk_prob = cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x_TD: torch.Tensor, recompute_from: Optional[Tuple[RMSNorm, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (topk_idx [T, K], topk_weight [T, K] fp32, scores [T, E] fp32).

        `recompute_from` = (norm, its input [T, D]) when x_TD is that norm's output: the gate GEMM
        then keeps the norm's input (which the norm keeps anyway) instead of x_TD and recomputes the
        norm in backward (DeepSeek-V3 section 3.2.3; the FP8 recipe, model/fp8.py, asks for it)."""
        if recompute_from is None:
            logits_TE = self.logits(x_TD)
        else:
            norm, src_TD = recompute_from
            logits_TE = recompute(lambda t: self.logits(RMSNorm.forward(norm, t)), [src_TD],
                                  [norm.weight, self.weight])
        scores_TE = logits_TE.sigmoid()
        topk_idx_TK = self.select(scores_TE.detach())
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(topk_idx_TK, self.n_experts)
        return topk_idx_TK, weight_TK * self.route_scale, scores_TE

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x @ W^T in fp32 (the recipe keeps the gate in fp32), whatever autocast says."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return _Fp32Linear.apply(x_TD, self.weight)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on the biased scores; at most `topk_group` groups per token."""
        biased_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            T = biased_TE.shape[0]
            grouped_TGe = biased_TE.view(T, self.n_group, -1)
            per_group = min(2, grouped_TGe.shape[-1])
            group_score_TG = grouped_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
            kept_TG = group_score_TG.topk(self.topk_group, dim=-1).indices
            dropped_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_TG, False)
            biased_TE = grouped_TGe.masked_fill(dropped_TG.unsqueeze(-1), float("-inf")).view(T, -1)
        return biased_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_bias(self, gamma: float, load_E: Optional[torch.Tensor] = None) -> None:
        """Auxiliary-loss-free balancing: b -= gamma for overloaded experts, += gamma for underloaded.

        `load_E` defaults to the tokens counted since the last update (pass the all-reduced global
        load in data/expert-parallel runs). Resets the counters.
        """
        load_E = self.tokens_per_expert if load_E is None else load_E
        self.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E)
        self.tokens_per_expert.zero_()


def sequence_balance_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i averaged over sequences (report eq. 17-20, without alpha)."""
    T, E = scores_TE.shape
    K = topk_idx_TK.shape[1]
    seq_len = T // n_seq
    probs_BSE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(n_seq, seq_len, E)
    counts_BE = torch.zeros(n_seq, E, device=scores_TE.device).scatter_add_(
        1, topk_idx_TK.view(n_seq, seq_len * K), torch.ones(n_seq, seq_len * K, device=scores_TE.device))
    f_BE = counts_BE * E / (K * seq_len)
    return (f_BE * probs_BSE.mean(dim=1)).sum(dim=1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on y whose backward also sends d(total)/d(aux) = `weight` into the aux loss."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_y, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


class MoE(nn.Module):
    """Router + routed experts (through a dispatcher) + shared expert, run while the routed tokens travel."""

    def __init__(self, cfg: ModelConfig, experts: Optional[GroupedExperts] = None):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = experts or GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatcher()
        self.aux_loss_weight = cfg.aux_loss_alpha
        self.last_balance_loss = torch.zeros(())

    def forward(self, x_BSD: torch.Tensor, recompute_from: Optional[Tuple[RMSNorm, torch.Tensor]] = None
                ) -> torch.Tensor:
        """`recompute_from` = (norm, its input [B, S, D]) when x is that norm's output: the router
        recomputes the norm instead of keeping x (`Router.forward`)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        gate_from = None if recompute_from is None else (recompute_from[0], recompute_from[1].reshape(-1, D))
        topk_idx_TK, weight_TK, scores_TE = self.gate(x_TD, gate_from)
        flight = self.dispatcher.start(x_TD, topk_idx_TK, weight_TK, self.experts)
        shared_TD = self.shared_experts(x_TD) if self.shared_experts is not None else None
        y_TD = flight.wait()
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        if self.training and torch.is_grad_enabled() and self.aux_loss_weight > 0:
            aux = sequence_balance_loss(scores_TE, topk_idx_TK, B)
            self.last_balance_loss = aux.detach()
            y_TD = _AttachAuxLoss.apply(y_TD, aux, self.aux_loss_weight)
        return y_TD.view(B, S, D)


@torch.no_grad()
def stacked_expert_load(layers: Sequence[MoE], device: torch.device) -> torch.Tensor:
    """Tokens routed to each expert of `layers` since their last bias update: [len(layers), E]
    ([0, 0] on `device` without MoE layers, so collectives over it stay on the model's device)."""
    if not layers:
        return torch.zeros(0, 0, device=device)
    return torch.stack([m.gate.tokens_per_expert for m in layers])


@torch.no_grad()
def update_router_biases(layers: Sequence[MoE], gamma: float, load_LE: Optional[torch.Tensor] = None) -> None:
    """Bias update of every router in `layers` (row i of `load_LE` for layer i; resets the counters)."""
    for i, m in enumerate(layers):
        m.gate.update_bias(gamma, None if load_LE is None else load_LE[i])


def set_balance_loss_weight(layers: Sequence[MoE], weight: float) -> None:
    """Gradient weight of the sequence-wise balance loss (alpha / micro-batches per step) of `layers`."""
    for m in layers:
        m.aux_loss_weight = weight
