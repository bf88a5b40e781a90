"""Token dispatch / combine for expert parallelism: flat and hierarchical (inter-node, then intra-node).

DeepSeek-V3 section 3.2.2: routed experts are spread over the EP ranks of several nodes; a token is
sent over the inter-node network (IB) once to each node that hosts one of its experts, landing on the
rank with the *same local index* as its source, and forwarded inside the node (NVLink) to the ranks
that host its experts. Combine runs the path backwards, and the outputs of a token's experts on one
node are summed (weighted by the gate weights) inside that node before the inter-node hop back. With
node-limited routing (the router's groups lie inside nodes, see `parallel/mesh.py`) a token crosses
at most `topk_group` node boundaries.

Both dispatchers here are the same machine driven by a different list of *hops*. A hop sends each
row once to every peer that owns one of the row's experts; a peer owns a contiguous block of
`experts_per_peer` expert ids:
- flat: one hop over all EP ranks (peer = rank, block = the rank's experts);
- hierarchical: hop 1 over the ranks of my rail (peer = node, block = the node's experts, destination
  = that node's rank with my local index), hop 2 over the ranks of my node (peer = local rank).
Indices are re-based at each hop (global -> node-relative -> rank-relative), so the receiver of the
last hop holds, per received row, the ids of its own experts among the row's top-k (-1 elsewhere)
and the gate weights. It runs its experts, sums each row's weighted outputs, and combine undoes the
hops, summing the copies of a row at every level. No token is ever dropped; counts are uneven.

Autograd: `_Dispatch` (hidden rows + gate weights) and `_Combine` are autograd Functions whose
backward is the reverse all-to-all (FACTS.md: `dist.all_to_all` with uneven lists fails on gloo, so
everything is `all_to_all_single`). With `fp8=True` the hidden rows travel as e4m3 + 1x128 scales
(quantized once at the source, forwarded as bytes) and the gradient flows straight through. Other
rows (hidden rows without FP8, combine partial sums, gradients) travel in the *wire dtype*: BF16
inside bf16 autocast (the routed experts still compute in the parameters' dtype), else the input's
dtype; sums of copies are accumulated in fp32 and the layer returns the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from model.moe import GroupedExperts, count_per_expert

from .comm import (TrafficCounter, all_to_all_rows, dequantize_rows_fp8, exchange_counts, fp8_row_bytes,
                   quantize_rows_fp8)
from .mesh import DISPATCHERS


@dataclass
class Hop:
    """One all-to-all: copy c of this hop carries source row `src_rows[c]` to EP rank `dest_ranks[c]`;
    copies are grouped by destination EP rank (`send_counts[r]` for rank r) and `recv_counts[r]` rows
    arrive from rank r, carrying `recv_pairs` (row, own expert) pairs for the receiver in all."""

    src_rows: torch.Tensor
    dest_ranks: torch.Tensor
    n_src: int
    send_counts: List[int]
    recv_counts: List[int]
    recv_pairs: int


def _ranks_on(peer_ranks: Sequence[int], device: torch.device) -> torch.Tensor:
    """The peer ranks (an arithmetic progression in every hop layout) as an int64 tensor on `device`,
    made by `arange` rather than copied from the host."""
    first, n = peer_ranks[0], len(peer_ranks)
    step = peer_ranks[1] - first if n > 1 else 1
    if list(peer_ranks) != list(range(first, first + step * n, step)):
        raise ValueError(f"dispatch: peer ranks {list(peer_ranks)} are not evenly spaced")
    return torch.arange(first, first + step * n, step, dtype=torch.int64, device=device)


def plan_hop(idx_RK: torch.Tensor, experts_per_peer: int, peer_ranks: Sequence[int],
             group: Optional[dist.ProcessGroup], ep_size: int) -> Tuple[Hop, torch.Tensor]:
    """Plan one hop for rows whose top-k expert ids are `idx_RK` (-1 = not on this path).

    Peer p (EP rank `peer_ranks[p]`, ascending) owns ids [p * experts_per_peer, (p + 1) * experts_per_peer).
    Returns the hop and the received rows' ids re-based to the receiver's block (-1 where not its own).
    The counts exchange carries, per peer, the rows and the (row, expert) pairs sent; they reach the host
    in one read, the hop's only synchronization: the copies are then listed without `nonzero`.
    """
    R, K = idx_RK.shape
    n_peers = len(peer_ranks)
    valid_RK = idx_RK >= 0
    peer_RK = torch.where(valid_RK, idx_RK // experts_per_peer, n_peers).long()
    device = idx_RK.device
    hit_RP = torch.zeros(R, n_peers + 1, dtype=torch.bool, device=device).scatter_(1, peer_RK, True)
    pairs_P = torch.zeros(n_peers + 1, dtype=torch.int64, device=device).scatter_add_(
        0, peer_RK.flatten(), torch.ones(R * K, dtype=torch.int64, device=device))
    ranks = _ranks_on(peer_ranks, device)
    send = torch.zeros(ep_size, 2, dtype=torch.int64, device=device)
    send[ranks, 0] = hit_RP[:, :n_peers].sum(dim=0)
    send[ranks, 1] = pairs_P[:n_peers]
    recv = exchange_counts(send, group)
    counts = torch.cat([send[:, 0], recv[:, 0], recv[:, 1].sum().view(1)]).tolist()
    send_counts, recv_counts, recv_pairs = counts[:ep_size], counts[ep_size:2 * ep_size], counts[-1]
    hit_C = torch.argsort((~hit_RP[:, :n_peers]).t().flatten().to(torch.uint8), stable=True)[:sum(send_counts)]
    peer_C, row_C = hit_C // R, hit_C % R
    idx_CK = idx_RK[row_C]
    base_C1 = (peer_C * experts_per_peer).unsqueeze(1)
    mine_CK = (idx_CK >= 0) & (idx_CK >= base_C1) & (idx_CK < base_C1 + experts_per_peer)
    local_CK = torch.where(mine_CK, idx_CK - base_C1, -1).to(torch.int32)
    hop = Hop(row_C, ranks[peer_C], R, send_counts, recv_counts, recv_pairs)
    return hop, all_to_all_rows(local_CK, hop.send_counts, hop.recv_counts, group)


def _forward_rows(x: torch.Tensor, hop: Hop, group) -> torch.Tensor:
    return all_to_all_rows(x[hop.src_rows], hop.send_counts, hop.recv_counts, group)


def _backward_rows(y: torch.Tensor, hop: Hop, group) -> torch.Tensor:
    """Send copies back to their sources and sum the copies of each source row (fp32 accumulation)."""
    back = all_to_all_rows(y, hop.recv_counts, hop.send_counts, group)
    out = torch.zeros((hop.n_src,) + tuple(y.shape[1:]), dtype=torch.float32, device=y.device)
    return out.index_add_(0, hop.src_rows, back.float()).to(y.dtype)


class _Dispatch(torch.autograd.Function):
    """(x_TD, w_TK) -> (x_CD, w_CK) at the last hop's receivers; backward = reverse hops + sum.

    Hidden rows travel as `wire` dtype (or FP8 rows) and arrive in x's dtype; gate weights in fp32.
    """

    @staticmethod
    def forward(ctx, x_TD, w_TK, hops: List[Hop], group, fp8: bool, wire: torch.dtype):
        ctx.hops, ctx.group, ctx.wire = hops, group, wire
        payload = quantize_rows_fp8(x_TD) if fp8 else x_TD.to(wire)
        w = w_TK
        for hop in hops:
            payload, w = _forward_rows(payload, hop, group), _forward_rows(w, hop, group)
        x = dequantize_rows_fp8(payload, x_TD.shape[1], x_TD.dtype) if fp8 else payload.to(x_TD.dtype)
        return x, w

    @staticmethod
    def backward(ctx, grad_x, grad_w):
        dtype, grad_x = grad_x.dtype, grad_x.to(ctx.wire)
        for hop in reversed(ctx.hops):
            grad_x, grad_w = _backward_rows(grad_x, hop, ctx.group), _backward_rows(grad_w, hop, ctx.group)
        return grad_x.to(dtype), grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    """Partial outputs y_CD at the receivers -> y_TD at the sources (copies summed at every hop, in
    fp32, sent as `wire` dtype); the output keeps y_CD's dtype."""

    @staticmethod
    def forward(ctx, y_CD, hops: List[Hop], group, wire: torch.dtype):
        ctx.hops, ctx.group, ctx.wire = hops, group, wire
        y = y_CD.to(wire)
        for hop in reversed(hops):
            y = _backward_rows(y, hop, group)
        return y.to(y_CD.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        dtype, grad_y = grad_y.dtype, grad_y.to(ctx.wire)
        for hop in ctx.hops:
            grad_y = _forward_rows(grad_y, hop, ctx.group)
        return grad_y.to(dtype), None, None, None


def wire_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of hidden rows on the wire: the autocast dtype (BF16) inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def run_local_experts(experts: GroupedExperts, x_CD: torch.Tensor, idx_CK: torch.Tensor,
                      w_CK: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """For each received row, sum over its experts on this rank of w * expert(x) (fp32, cast to x dtype);
    the gate weight w enters the expert before its down projection, as in the local dispatcher.
    `n_pairs` (known from the counts exchange) is the number of ids >= 0 in idx_CK.

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
        y_PD = experts(x_CD[c_P], counts_E, w_CK[c_P, k_P].float())
    y_CD = torch.zeros(C, D, dtype=torch.float32, device=x_CD.device).index_add(0, c_P, y_PD.float())
    return y_CD.to(x_CD.dtype)


class ExpertParallelDispatcher:
    """Common machinery; subclasses choose the hops. Callable as an MoE dispatcher:
    (x_TD, topk_idx_TK with global expert ids, topk_weight_TK, experts with this rank's E/ep experts) -> y_TD.

    `gpus_per_node` consecutive EP ranks form a node (an EP group inside one node: pass >= ep).
    Counters (bytes this rank sent in forward passes since `reset_traffic()`): `a2a_internode_bytes`,
    `a2a_intranode_bytes` (payload: dispatch + combine) and `traffic.bytes` for the detail.
    `last_nodes_per_token` holds, for the last call, how many nodes each token was sent to.
    """

    def __init__(self, ep_group: Optional[dist.ProcessGroup], gpus_per_node: int, fp8: bool = False):
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.gpus_per_node = min(gpus_per_node, self.ep_size)
        if self.ep_size % self.gpus_per_node:
            raise ValueError(f"parallel.ep ({self.ep_size}) must be a multiple of parallel.gpus_per_node "
                             f"({gpus_per_node}) when the EP group spans several nodes")
        self.n_nodes = self.ep_size // self.gpus_per_node
        self.fp8 = fp8
        self.traffic = TrafficCounter(self.gpus_per_node, self.ep_rank)
        self.last_nodes_per_token: Optional[torch.Tensor] = None

    def hop_layout(self, experts_per_rank: int) -> List[Tuple[int, List[int]]]:
        """[(experts_per_peer, peer EP ranks ascending)] for each hop of the dispatch."""
        raise NotImplementedError

    @property
    def a2a_internode_bytes(self) -> int:
        return self.traffic.get("dispatch_internode") + self.traffic.get("combine_internode")

    @property
    def a2a_intranode_bytes(self) -> int:
        return self.traffic.get("dispatch_intranode") + self.traffic.get("combine_intranode")

    def reset_traffic(self) -> None:
        self.traffic.reset()

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        hops: List[Hop] = []
        idx = topk_idx_TK
        with torch.no_grad():
            for experts_per_peer, peers in self.hop_layout(experts.num_experts):
                hop, idx = plan_hop(idx, experts_per_peer, peers, self.group, self.ep_size)
                hops.append(hop)
        wire = wire_dtype(x_TD)
        self._account(hops, x_TD.shape[1], wire, topk_idx_TK.shape[1])
        x_CD, w_CK = _Dispatch.apply(x_TD, topk_weight_TK.float(), hops, self.group, self.fp8, wire)
        y_CD = run_local_experts(experts, x_CD, idx, w_CK, hops[-1].recv_pairs if hops else 0)
        return _Combine.apply(y_CD, hops, self.group, wire)

    def _account(self, hops: List[Hop], D: int, wire: torch.dtype, top_k: int) -> None:
        row = D * torch.finfo(wire).bits // 8
        payload = fp8_row_bytes(D) if self.fp8 else row
        for hop in hops:
            self.traffic.add("dispatch", hop.send_counts, payload)
            self.traffic.add("combine", hop.recv_counts, row)
            self.traffic.add("meta", hop.send_counts, top_k * 8)
            self.traffic.add("meta", [1] * self.ep_size, 16)
        if hops:
            first = hops[0]
            hit_TN = torch.zeros(first.n_src, self.n_nodes, dtype=torch.bool, device=first.src_rows.device)
            hit_TN[first.src_rows, first.dest_ranks // self.gpus_per_node] = True
            self.last_nodes_per_token = hit_TN.sum(dim=1)


class FlatDispatcher(ExpertParallelDispatcher):
    """One all-to-all over the EP group: one copy of a token per rank that hosts one of its experts."""

    def hop_layout(self, experts_per_rank: int) -> List[Tuple[int, List[int]]]:
        return [(experts_per_rank, list(range(self.ep_size)))]


class HierarchicalDispatcher(ExpertParallelDispatcher):
    """Inter-node hop to the same local index on each target node, then an intra-node hop.

    With one node it is the flat dispatcher; with one rank per node the intra-node hop vanishes.
    """

    def hop_layout(self, experts_per_rank: int) -> List[Tuple[int, List[int]]]:
        G = self.gpus_per_node
        node, local = divmod(self.ep_rank, G)
        hops = []
        if self.n_nodes > 1:
            hops.append((G * experts_per_rank, [n * G + local for n in range(self.n_nodes)]))
        if G > 1 or not hops:
            hops.append((experts_per_rank, [node * G + peer for peer in range(G)]))
        return hops


def make_dispatcher(name: str, ep_group: Optional[dist.ProcessGroup], gpus_per_node: int,
                    fp8: bool = False) -> ExpertParallelDispatcher:
    """`parallel.dispatcher` name -> dispatcher object."""
    classes = {"flat": FlatDispatcher, "hierarchical": HierarchicalDispatcher}
    if name not in classes:
        raise ValueError(f"parallel.dispatcher must be one of {DISPATCHERS}, got {name!r}")
    return classes[name](ep_group, gpus_per_node, fp8=fp8)


def internode_minimum_bytes(topk_idx_TK: torch.Tensor, experts_per_node: int, my_node: int,
                            row_bytes: int) -> int:
    """The least inter-node dispatch traffic: one row per token per target node other than its own."""
    nodes_TK = topk_idx_TK // experts_per_node
    n_nodes = int(nodes_TK.max()) + 1 if nodes_TK.numel() else 1
    hit_TN = torch.zeros(topk_idx_TK.shape[0], max(n_nodes, my_node + 1), dtype=torch.bool)
    hit_TN.scatter_(1, nodes_TK, True)
    hit_TN[:, my_node] = False
    return int(hit_TN.sum()) * row_bytes
