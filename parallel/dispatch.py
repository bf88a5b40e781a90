"""Token dispatch / combine for expert parallelism: flat and hierarchical (inter-node, then intra-node),
asynchronous so that computation runs while tokens travel.

DeepSeek-V3 section 3.2.2: routed experts are spread over the EP ranks of several nodes; a token is
sent over the inter-node network (IB) once to each node that hosts one of its experts, landing on the
rank with the *same local index* as its source, and forwarded inside the node (NVLink) to the ranks
that host its experts. Combine runs the path backwards, and the outputs of a token's experts on one
node are summed (weighted by the gate weights) inside that node before the inter-node hop back. With
node-limited routing (the router's groups lie inside nodes, see `parallel/mesh.py`) a token crosses
at most `topk_group` node boundaries. Section 3.2.1: the all-to-all is hidden behind computation.

Both dispatchers are the same machine driven by a different list of *hops* (`parallel/dispatch_plan.py`):
- flat: one hop over the EP group (peer = rank, block = the rank's experts);
- hierarchical: a hop over my *rail* (the ranks with my local index on every node; peer = node,
  block = the node's experts), then one over my *node* (peer = local rank), each on its own process
  group (`comm.hop_groups`), so no rank waits in a collective it has nothing to do with.
A hop carries each row once to every peer owning one of its experts, as one `all_to_all_single` of
packed rows (payload, the row's expert ids re-based to the peer's block, gate weights). Every hop's
counts come from one exchange per layer: the layer's only host synchronization. The receiver of the
last hop runs its experts on the (row, own expert) pairs, sums each row's weighted outputs, and
combine undoes the hops, summing the copies of a row at every level. No token is dropped.

Interface (the MoE layer, and a pipeline schedule that interleaves two micro-batches, use it):

    flight = dispatcher.start(x_TD, topk_idx_TK, topk_weight_TK, experts)  # counts exchanged, first hop sent
    ...computation that does not need the routed output (the shared expert, another micro-batch)...
    flight.wait_dispatch()   # the tokens have arrived (later hops run here)
    flight.run_experts()     # this rank's experts on them
    flight.start_combine()   # first hop back sent
    ...computation...
    y_TD = flight.wait()     # outputs back at their tokens; each step runs the earlier ones if needed

`dispatcher(x_TD, topk_idx_TK, topk_weight_TK, experts)` is `start(...).wait()`. Autograd: each
asynchronous step is a pair of autograd Functions (start, wait) joined by an empty token tensor; in
backward the wait's node starts the reverse all-to-all and the start's node waits for it, so autograd
runs whatever is ready in between (the shared expert's backward, created between the two in forward,
runs while the dispatch's gradients travel). gloo has no uneven `dist.all_to_all` (FACTS.md), so every
hop is an `all_to_all_single` of uint8 rows. With `fp8=True` the hidden rows travel as e4m3 + 1x128
scales, quantized once at the source with the experts' scale rule, and experts that read FP8 input
(`takes_fp8_input`) get those bytes as their GEMM operand instead of quantizing again; the gradient
flows straight through. Other rows (hidden rows without FP8, combine partial sums, gradients) travel in
the *wire dtype*: BF16 inside bf16 autocast (the routed experts still compute in the parameters' dtype),
else the input's dtype; sums of copies are accumulated in fp32 and the layer returns the input's dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from model.moe import GroupedExperts

from .comm import TrafficCounter, fp8_row_bytes, hop_groups
from .dispatch_flight import NO_HOOKS, MoEFlight, Transit, WaitHooks, run_local_experts
from .dispatch_plan import Hop, Plan, dest_ranks, make_plan
from .mesh import DISPATCHERS

__all__ = ["ExpertParallelDispatcher", "FlatDispatcher", "HierarchicalDispatcher", "MoEFlight", "WaitHooks",
           "make_dispatcher", "run_local_experts", "wire_dtype", "internode_minimum_bytes"]


def wire_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of hidden rows on the wire: the autocast dtype (BF16) inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertParallelDispatcher:
    """Common machinery; subclasses choose the hop structure. `start(x_TD, topk_idx_TK with global
    expert ids, topk_weight_TK, experts with this rank's E/ep experts)` -> `MoEFlight`; calling the
    dispatcher is `start(...).wait()` -> y_TD.

    `gpus_per_node` consecutive EP ranks form a node (an EP group inside one node: pass >= ep). The
    hierarchical dispatcher's rail and node process groups are made here (`comm.hop_groups`, a
    collective over the world when the EP group spans nodes of several ranks).
    Counters (bytes this rank sent in forward passes since `reset_traffic()`): `a2a_internode_bytes`,
    `a2a_intranode_bytes` (payload: dispatch + combine) and `traffic.bytes` for the detail.
    `last_nodes_per_token` holds, for the last call, how many nodes each token was sent to.
    `wait_hooks` (`dispatch_flight.WaitHooks`, no-ops by default) run around every blocking wait.
    """

    hop_node_size: int  # ranks per node of the hop structure (set by the subclass)

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
        self.wait_hooks: WaitHooks = NO_HOOKS
        self.rail_group, self.node_group = hop_groups(ep_group, self.hop_node_size)

    @property
    def a2a_internode_bytes(self) -> int:
        return self.traffic.get("dispatch_internode") + self.traffic.get("combine_internode")

    @property
    def a2a_intranode_bytes(self) -> int:
        return self.traffic.get("dispatch_intranode") + self.traffic.get("combine_intranode")

    def reset_traffic(self) -> None:
        self.traffic.reset()

    def plan(self, topk_idx_TK: torch.Tensor, experts_per_rank: int) -> Plan:
        """Every hop's counts for these tokens (one exchange over the EP group, one host read; the
        wait hooks run around it)."""
        self.wait_hooks.before()
        with torch.no_grad():
            plan = make_plan(topk_idx_TK, experts_per_rank, self.group, self.hop_node_size,
                             self.rail_group, self.node_group)
        self.wait_hooks.after()
        return plan

    def start(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
              experts: GroupedExperts) -> MoEFlight:
        """Exchange the counts and send the tokens' first hop; the returned flight finishes the rest."""
        plan = self.plan(topk_idx_TK, experts.num_experts)
        wire = wire_dtype(x_TD)
        pow2 = bool(getattr(experts, "fp8_pow2", False)) and bool(getattr(experts, "takes_fp8_input", False))
        transit = Transit(plan, x_TD.shape[1], topk_idx_TK.shape[1], wire, self.fp8, pow2, self.wait_hooks)
        flight = MoEFlight(transit, x_TD, topk_idx_TK, topk_weight_TK, experts)
        self._account(plan.hops, x_TD.shape[1], wire, topk_idx_TK.shape[1])
        return flight

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        return self.start(x_TD, topk_idx_TK, topk_weight_TK, experts).wait()

    def _by_rank(self, hop: Hop, counts: List[int]) -> List[int]:
        out = [0] * self.ep_size
        for rank, c in zip(hop.peer_ranks, counts):
            out[rank] = c
        return out

    def _account(self, hops: List[Hop], D: int, wire: torch.dtype, top_k: int) -> None:
        row = D * torch.finfo(wire).bits // 8
        payload = fp8_row_bytes(D) if self.fp8 else row
        counts_exchanged = (2 * self.ep_size + self.ep_size // self.hop_node_size) * 8
        self.traffic.add("meta", [1] * self.ep_size, counts_exchanged)
        for hop in hops:
            sent, received = self._by_rank(hop, hop.send_counts), self._by_rank(hop, hop.recv_counts)
            self.traffic.add("dispatch", sent, payload)
            self.traffic.add("combine", received, row)
            self.traffic.add("meta", sent, top_k * 8)
        first = hops[0]
        hit_TN = torch.zeros(first.n_src, self.n_nodes, dtype=torch.bool, device=first.src_rows.device)
        hit_TN[first.src_rows, dest_ranks(first) // self.gpus_per_node] = True
        self.last_nodes_per_token = hit_TN.sum(dim=1)


class FlatDispatcher(ExpertParallelDispatcher):
    """One all-to-all over the EP group: one copy of a token per rank that hosts one of its experts."""

    def __init__(self, ep_group: Optional[dist.ProcessGroup], gpus_per_node: int, fp8: bool = False):
        self.hop_node_size = dist.get_world_size(ep_group)
        super().__init__(ep_group, gpus_per_node, fp8)


class HierarchicalDispatcher(ExpertParallelDispatcher):
    """Inter-node hop (rail group) to the same local index on each target node, then an intra-node hop
    (node group). With one node it is the flat dispatcher; with one rank per node the intra-node hop
    vanishes."""

    def __init__(self, ep_group: Optional[dist.ProcessGroup], gpus_per_node: int, fp8: bool = False):
        self.hop_node_size = min(gpus_per_node, dist.get_world_size(ep_group))
        super().__init__(ep_group, gpus_per_node, fp8)


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
