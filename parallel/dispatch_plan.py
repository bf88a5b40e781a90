"""The routing plan of one expert-parallel dispatch: every hop's row counts from one exchange.

DeepSeek-V3 section 3.2.2. A dispatch is one or two *hops* (`parallel/dispatch.py`): the flat
dispatcher sends each token once to every EP rank that hosts one of its experts; the hierarchical one
sends it once to each target node, to the rank with its own local index (over the *rail* group), and
that rank forwards it inside the node (over the *node* group). An all-to-all needs its split sizes on
the host before it starts, and the second hop's sizes depend on what the first delivers. Reading
them per hop would cost one host synchronization each; here each rank instead publishes, once per
MoE layer, how many of its tokens reach every EP rank and every node and how many (token, expert)
pairs it sends every rank (one all-gather of 2 x ep + nodes integers over the EP group), and every
hop's send and receive counts follow on the host from that table, with one read (the layer's only
host synchronization, the token counts DeepSeek's kernels also exchange first):

- rail hop, rank (node n, local l) and rail peer m: sends the tokens of its own that reach node m,
  receives those of rank (m, l) that reach node n;
- node hop, to local peer l': sends what reached it over the rail (from every (m, l)) bound for
  rank (n, l'), receives what reached (n, l') bound for itself; with one node this is the flat hop.

Which rows go where is then computed on the device as the rows arrive (`route`), in an order whose
per-peer counts are exactly those: nothing else waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .comm import gather_counts


@dataclass
class Hop:
    """One all-to-all over `group`, whose member p (group rank) is EP rank `peer_ranks[p]` and owns
    the hop-level expert ids [p * experts_per_peer, (p + 1) * experts_per_peer): `send_counts[p]` rows
    go to peer p, `recv_counts[p]` arrive from it. `src_rows` (set by `route` when the hop's rows are
    known) lists each sent copy's source row, grouped by peer; `n_src` rows were there to send."""

    group: Optional[dist.ProcessGroup]
    peer_ranks: List[int]
    experts_per_peer: int
    send_counts: List[int]
    recv_counts: List[int]
    src_rows: Optional[torch.Tensor] = None
    dest_peers: Optional[torch.Tensor] = None
    n_src: int = 0


@dataclass
class Plan:
    """The hops of one dispatch, in order, and the (row, expert) pairs the last hop delivers here."""

    hops: List[Hop]
    recv_pairs: int


def local_counts(idx_TK: torch.Tensor, experts_per_rank: int, ep_size: int, ranks_per_node: int) -> torch.Tensor:
    """int64 [2 * ep + nodes]: tokens reaching each EP rank, (token, expert) pairs per EP rank, tokens
    reaching each node (nodes of `ranks_per_node` consecutive ranks); computed on the device."""
    T, K = idx_TK.shape
    device = idx_TK.device
    rank_TK = (idx_TK // experts_per_rank).long()
    n_nodes = ep_size // ranks_per_node
    hit_TR = torch.zeros(T, ep_size, dtype=torch.bool, device=device).scatter_(1, rank_TK, True)
    hit_TN = torch.zeros(T, n_nodes, dtype=torch.bool, device=device).scatter_(1, rank_TK // ranks_per_node, True)
    pairs_R = torch.zeros(ep_size, dtype=torch.int64, device=device).scatter_add_(
        0, rank_TK.flatten(), torch.ones(T * K, dtype=torch.int64, device=device))
    return torch.cat([hit_TR.sum(0), pairs_R, hit_TN.sum(0)])


def make_plan(idx_TK: torch.Tensor, experts_per_rank: int, ep_group: Optional[dist.ProcessGroup],
              ranks_per_node: int, rail_group, node_group) -> Plan:
    """Exchange the counts of `local_counts` over the EP group and derive every hop's (module docstring).

    `ranks_per_node` is the hop structure's node size (the EP size for the flat dispatcher); a rail
    hop exists with several nodes, a node hop with several ranks per node (or when it is the only hop).
    """
    ep_size, me = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    G, n_nodes = ranks_per_node, ep_size // ranks_per_node
    node, local = divmod(me, G)
    table = gather_counts(local_counts(idx_TK, experts_per_rank, ep_size, G), ep_group).tolist()
    rows = [t[:ep_size] for t in table]
    pairs = [t[ep_size:2 * ep_size] for t in table]
    nodes = [t[2 * ep_size:] for t in table]
    hops = []
    if n_nodes > 1:
        rail = [m * G + local for m in range(n_nodes)]
        hops.append(Hop(rail_group, rail, G * experts_per_rank, list(nodes[me]), [nodes[r][node] for r in rail]))
    if G > 1 or not hops:
        peers = [node * G + p for p in range(G)]
        senders = [m * G + local for m in range(n_nodes)]
        send = [sum(rows[s][r] for s in senders) for r in peers]
        recv = [sum(rows[m * G + p][me] for m in range(n_nodes)) for p in range(G)]
        hops.append(Hop(node_group, peers, experts_per_rank, send, recv))
    return Plan(hops, sum(p[me] for p in pairs))


def route(idx_RK: torch.Tensor, hop: Hop) -> torch.Tensor:
    """Fill `hop.src_rows` / `dest_peers` for rows whose hop-level expert ids are `idx_RK` (-1: not on
    this path): one copy per (row, peer owning one of its ids), grouped by peer, rows ascending.
    Returns the copies' ids re-based to their peer's block (int32, -1 where not the peer's)."""
    R, K = idx_RK.shape
    n_peers, epp = len(hop.peer_ranks), hop.experts_per_peer
    device = idx_RK.device
    peer_RK = torch.where(idx_RK >= 0, idx_RK // epp, n_peers).long()
    hit_RP = torch.zeros(R, n_peers + 1, dtype=torch.bool, device=device).scatter_(1, peer_RK, True)
    hit_C = torch.argsort((~hit_RP[:, :n_peers]).t().flatten().to(torch.uint8), stable=True)[:sum(hop.send_counts)]
    peer_C, row_C = hit_C // R, hit_C % R
    idx_CK = idx_RK[row_C]
    base_C1 = (peer_C * epp).unsqueeze(1)
    mine_CK = (idx_CK >= 0) & (idx_CK >= base_C1) & (idx_CK < base_C1 + epp)
    hop.src_rows, hop.dest_peers, hop.n_src = row_C, peer_C, R
    return torch.where(mine_CK, idx_CK - base_C1, -1).to(torch.int32)


def dest_ranks(hop: Hop) -> torch.Tensor:
    """EP rank of every copy `route` made for `hop` (its peers are an arithmetic progression of EP ranks)."""
    first = hop.peer_ranks[0]
    step = hop.peer_ranks[1] - first if len(hop.peer_ranks) > 1 else 1
    return first + step * hop.dest_peers
