"""One MoE layer's routed tokens in flight: the asynchronous steps of dispatch and combine as autograd
Functions, and this rank's experts on what arrives (DeepSeek-V3 sections 3.2.1-3.2.2, 3.3.1).

`parallel/dispatch.py` documents the interface (`MoEFlight`) and makes the plan; here the plan's hops
are run. Each asynchronous step is a pair of autograd Functions joined by an empty token tensor: the
start sends the step's first hop (`all_to_all_single(async_op=True)`), the wait waits for it and runs
the step's later hops. In backward the roles swap: the wait's node starts the reverse all-to-all and
the start's node waits for it, so autograd runs the nodes created between them in forward (the shared
expert) while the gradients travel. Dispatch rows are packed bytes (payload, hop-level expert ids,
gate weights: one all-to-all per hop); with an FP8 payload the experts that take FP8 input read the
received e4m3 bytes and scales as their first GEMM's operand. Every blocking wait (an all-to-all of a
hop in either direction, and the counts exchange) runs between a `WaitHooks`' `before()` and
`after()`: no-ops by default; a schedule that interleaves two micro-batches (parallel/pipeline_overlap.py)
sets hooks that let the other micro-batch compute while this one waits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from model.moe import GroupedExperts, count_per_expert

from .comm import (PendingRows, dequantize_rows_fp8, fp8_row_bytes, pack_rows, quantize_rows_fp8, split_rows_fp8,
                   start_all_to_all_rows, unpack_rows)
from .dispatch_plan import Hop, Plan, route


class WaitHooks:
    """Called around each blocking communication wait of a dispatch or combine, forward and backward:
    `before()` just before the thread blocks, `after()` once the data is there. Does nothing; subclass
    it and set it as the dispatcher's `wait_hooks`."""

    def before(self) -> None:
        """The calling thread is about to block on communication."""

    def after(self) -> None:
        """The communication the thread waited for has completed."""


NO_HOOKS = WaitHooks()


def _sum_copies(rows: torch.Tensor, hop: Hop) -> torch.Tensor:
    """Copies that came back from a hop's peers -> fp32 sums per source row."""
    out = torch.zeros((hop.n_src,) + tuple(rows.shape[1:]), dtype=torch.float32, device=rows.device)
    return out.index_add_(0, hop.src_rows, rows.float())


class Transit:
    """The communication state of one dispatch + combine: the plan, and the one all-to-all in flight.

    Autograd contexts hold this object, so it holds no tensor that has a graph (no reference cycle
    through ctx). Directions: `forward` sends copies to the peers (dispatch, combine's backward),
    `backward` sends them back and sums them (combine, dispatch's backward)."""

    def __init__(self, plan: Plan, D: int, K: int, wire: torch.dtype, fp8: bool, pow2: bool,
                 hooks: WaitHooks = NO_HOOKS):
        self.plan, self.D, self.K, self.wire, self.fp8, self.pow2 = plan, D, K, wire, fp8, pow2
        self.hooks = hooks
        self.payload_bytes = fp8_row_bytes(D) if fp8 else D * torch.finfo(wire).bits // 8
        self.pending: Optional[PendingRows] = None
        self.idx_CK: Optional[torch.Tensor] = None
        self.fp8_rows: Optional[torch.Tensor] = None

    def _start(self, rows: torch.Tensor, hop: Hop, forward: bool) -> None:
        send, recv = (hop.send_counts, hop.recv_counts) if forward else (hop.recv_counts, hop.send_counts)
        self.pending = start_all_to_all_rows(rows[hop.src_rows] if forward else rows, send, recv, hop.group)

    def _finish(self) -> torch.Tensor:
        pending, self.pending = self.pending, None
        self.hooks.before()
        rows = pending.wait()
        self.hooks.after()
        return rows

    # -- dispatch: rows are packed (payload bytes, hop-level expert ids int32, gate weights fp32) --
    def _dispatch_rows(self, payload: torch.Tensor, idx_RK: torch.Tensor, w_bytes: torch.Tensor, hop: Hop) -> None:
        idx_CK = route(idx_RK, hop)
        self.pending = start_all_to_all_rows(pack_rows(payload[hop.src_rows], idx_CK, w_bytes[hop.src_rows]),
                                             hop.send_counts, hop.recv_counts, hop.group)

    def _unpack_dispatch(self, packed: torch.Tensor):
        return unpack_rows(packed, (self.payload_bytes, 4 * self.K, 4 * self.K),
                           (torch.uint8, torch.int32, torch.uint8))

    def start_dispatch(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> None:
        x_TD = x_TD.contiguous()
        payload = quantize_rows_fp8(x_TD, self.pow2) if self.fp8 else x_TD.to(self.wire).view(torch.uint8)
        self._dispatch_rows(payload, idx_TK, w_TK.contiguous().view(torch.uint8), self.plan.hops[0])

    def wait_dispatch(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        payload, idx, w_bytes = self._unpack_dispatch(self._finish())
        for hop in self.plan.hops[1:]:
            self._dispatch_rows(payload, idx, w_bytes, hop)
            payload, idx, w_bytes = self._unpack_dispatch(self._finish())
        self.idx_CK = idx
        if self.fp8:
            self.fp8_rows = payload
            x = dequantize_rows_fp8(payload, self.D, dtype)
        else:
            x = payload.contiguous().view(self.wire).to(dtype)
        return x, w_bytes.contiguous().view(torch.float32)

    def start_dispatch_backward(self, grad_x: torch.Tensor, grad_w: torch.Tensor) -> None:
        rows = pack_rows(grad_x.to(self.wire), grad_w.float())
        for hop in reversed(self.plan.hops[1:]):
            self._start(rows, hop, forward=False)
            rows = pack_rows(*self._sum_dispatch_grads(self._finish(), hop))
        self._start(rows, self.plan.hops[0], forward=False)

    def _sum_dispatch_grads(self, packed: torch.Tensor, hop: Hop) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed (x gradient in the wire dtype, gate-weight gradient fp32) copies -> sums per source row
        (fp32 sums; the x part cast back to the wire dtype)."""
        gx, gw = unpack_rows(packed, (self.D * torch.finfo(self.wire).bits // 8, 4 * self.K),
                             (self.wire, torch.float32))
        return _sum_copies(gx.view(-1, self.D), hop).to(self.wire), _sum_copies(gw.view(-1, self.K), hop)

    def wait_dispatch_backward(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        gx, gw = self._sum_dispatch_grads(self._finish(), self.plan.hops[0])
        return gx.to(dtype), gw

    # -- combine: partial outputs (and their gradients) in the wire dtype --
    def start_combine(self, y_CD: torch.Tensor) -> None:
        self._start(y_CD.to(self.wire), self.plan.hops[-1], forward=False)

    def wait_combine(self, dtype: torch.dtype) -> torch.Tensor:
        y = _sum_copies(self._finish(), self.plan.hops[-1])
        for hop in reversed(self.plan.hops[:-1]):
            self._start(y.to(self.wire), hop, forward=False)
            y = _sum_copies(self._finish(), hop)
        return y.to(dtype)

    def start_combine_backward(self, grad_y: torch.Tensor) -> None:
        self._start(grad_y.to(self.wire), self.plan.hops[0], forward=True)

    def wait_combine_backward(self, dtype: torch.dtype) -> torch.Tensor:
        g = self._finish()
        for hop in self.plan.hops[1:]:
            self._start(g, hop, forward=True)
            g = self._finish()
        return g.to(dtype)


def _token(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


class _DispatchStart(torch.autograd.Function):
    """Sends the first hop; returns the token that `_DispatchWait` takes. Backward: waits for the
    gradients `_DispatchWait.backward` sent back and sums the copies."""

    @staticmethod
    def forward(ctx, x_TD, w_TK, idx_TK, transit: Transit):
        ctx.transit, ctx.dtype = transit, x_TD.dtype
        transit.start_dispatch(x_TD, idx_TK, w_TK)
        return _token(x_TD)

    @staticmethod
    def backward(ctx, _grad_token):
        grad_x, grad_w = ctx.transit.wait_dispatch_backward(ctx.dtype)
        return grad_x, grad_w, None, None


class _DispatchWait(torch.autograd.Function):
    """Token -> (x_CD, w_CK) at the last hop's receivers. Backward: starts the reverse hops."""

    @staticmethod
    def forward(ctx, token, transit: Transit, dtype: torch.dtype):
        ctx.transit = transit
        return transit.wait_dispatch(dtype)

    @staticmethod
    def backward(ctx, grad_x, grad_w):
        ctx.transit.start_dispatch_backward(grad_x, grad_w)
        return _token(grad_x), None, None


class _CombineStart(torch.autograd.Function):
    """Sends the partial outputs y_CD back over the last hop; returns a token. Backward: waits for
    the output gradient `_CombineWait.backward` sent forward."""

    @staticmethod
    def forward(ctx, y_CD, transit: Transit):
        ctx.transit, ctx.dtype = transit, y_CD.dtype
        transit.start_combine(y_CD)
        return _token(y_CD)

    @staticmethod
    def backward(ctx, _grad_token):
        return ctx.transit.wait_combine_backward(ctx.dtype), None


class _CombineWait(torch.autograd.Function):
    """Token -> y_TD at the sources (copies summed at every hop, fp32). Backward: starts sending the
    output gradient forward."""

    @staticmethod
    def forward(ctx, token, transit: Transit, dtype: torch.dtype):
        ctx.transit = transit
        return transit.wait_combine(dtype)

    @staticmethod
    def backward(ctx, grad_y):
        ctx.transit.start_combine_backward(grad_y)
        return _token(grad_y), None, None


class MoEFlight:
    """One MoE layer's routed tokens on their way (`ExpertParallelDispatcher.start`); the steps of the
    module docstring's interface. Each step runs once; a later step runs the earlier ones first."""

    def __init__(self, transit: Transit, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor, experts: GroupedExperts):
        self.transit, self.experts, self.dtype = transit, experts, x_TD.dtype
        self._token = _DispatchStart.apply(x_TD, topk_weight_TK.float(), topk_idx_TK, transit)
        self.x_CD: Optional[torch.Tensor] = None
        self.w_CK: Optional[torch.Tensor] = None
        self.y_CD: Optional[torch.Tensor] = None
        self._combine_token: Optional[torch.Tensor] = None
        self.y_TD: Optional[torch.Tensor] = None

    def wait_dispatch(self) -> None:
        """Block until this rank has received its rows (x_CD, w_CK)."""
        if self.x_CD is None:
            self.x_CD, self.w_CK = _DispatchWait.apply(self._token, self.transit, self.dtype)

    def run_experts(self) -> None:
        """This rank's experts on the received rows (y_CD)."""
        if self.y_CD is None:
            self.wait_dispatch()
            t = self.transit
            fp8_rows = t.fp8_rows if getattr(self.experts, "takes_fp8_input", False) else None
            self.y_CD = run_local_experts(self.experts, self.x_CD, t.idx_CK, self.w_CK, t.plan.recv_pairs, fp8_rows)
            t.idx_CK = t.fp8_rows = None  # not needed any more: not kept until backward

    def start_combine(self) -> None:
        """Send the partial outputs back (first hop of the combine)."""
        if self._combine_token is None:
            self.run_experts()
            self._combine_token = _CombineStart.apply(self.y_CD, self.transit)

    def wait(self) -> torch.Tensor:
        """y_TD: the weighted sum of each token's routed experts, in x_TD's dtype."""
        if self.y_TD is None:
            self.start_combine()
            self.y_TD = _CombineWait.apply(self._combine_token, self.transit, self.dtype)
        return self.y_TD


def run_local_experts(experts: GroupedExperts, x_CD: torch.Tensor, idx_CK: torch.Tensor,
                      w_CK: torch.Tensor, n_pairs: int, fp8_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For each received row, sum over its experts on this rank of w * expert(x) (fp32, cast to x dtype);
    the gate weight w enters the expert before its down projection, as in the local dispatcher.
    `n_pairs` (known from the counts exchange) is the number of ids >= 0 in idx_CK. `fp8_rows`: the
    received FP8 payload (`comm.quantize_rows_fp8`) of x_CD, passed to experts that read it as it is.

    When no (row, expert) pair arrives, the experts are not called but enter the graph with a zero
    contribution, so their gradients are zeros rather than None on every rank.
    """
    C, D = x_CD.shape
    K = idx_CK.shape[1]
    pos_P = torch.argsort((idx_CK < 0).flatten().to(torch.uint8), stable=True)[:n_pairs]
    c_P, k_P = pos_P // K, pos_P % K
    e_P = idx_CK[c_P, k_P].long()
    order = torch.argsort(e_P, stable=True)
    c_P, k_P, e_P = c_P[order], k_P[order], e_P[order]
    if n_pairs == 0:
        params = sum(p.sum() for p in experts.parameters())
        y_PD = x_CD.new_zeros(0, D) + 0.0 * (x_CD.sum() + w_CK.sum() + params)
    else:
        counts_E = count_per_expert(e_P, experts.num_experts)
        extra = {} if fp8_rows is None else {"x_fp8": split_rows_fp8(fp8_rows[c_P], D)}
        y_PD = experts(x_CD[c_P], counts_E, w_CK[c_P, k_P].float(), **extra)
    y_CD = torch.zeros(C, D, dtype=torch.float32, device=x_CD.device).index_add(0, c_P, y_PD.float())
    return y_CD.to(x_CD.dtype)
