"""The process layout: a (pp, dp, ep) DeviceMesh and the node topology of the expert-parallel group.

DeepSeek-V3 section 3.1-3.2 (16-way pipeline, 64-way expert parallelism over 8 nodes, ZeRO-1 data
parallelism). Ranks are numbered node-major (what torchrun does: node n holds ranks
[n * gpus_per_node, (n + 1) * gpus_per_node)), and `ep` is the innermost mesh dimension, so an EP
group is a run of `ep` consecutive ranks. Rules, each checked with a ValueError naming the settings:

- pp * dp * ep == world size (dp may be left out and is then world / (pp * ep));
- model.n_routed_experts % ep == 0: EP rank r holds the contiguous experts [r * E/ep, (r + 1) * E/ep);
- the EP group must not straddle nodes unevenly: either ep <= gpus_per_node and gpus_per_node % ep == 0
  (the group lives inside one node), or ep % gpus_per_node == 0 (ep / gpus_per_node whole nodes);
- node-limited routing (required by the hierarchical dispatcher when the EP group spans nodes):
  model.n_group % (EP nodes) == 0, i.e. every router group lies inside one node, so a token that
  picks experts from `topk_group` groups reaches at most `topk_group` nodes. With n_group == EP nodes
  (DeepSeek-V3: 8 groups on 8 nodes) group == node and the bound is exactly "<= M nodes per token".

Gradient groups: dense parameters are replicated on every rank of a pipeline stage, so their
gradients reduce over dp x ep (`dense_grad_group`); an expert lives on one EP rank of each dp replica,
so its gradients reduce over dp (`expert_grad_group`).

Every group of the mesh is connected when the layout is built (`connect_groups`: one tiny
all-reduce each), so NCCL creates its communicators at start-up rather than inside the first
pipeline step or the first expert all-to-all, where a slow start would be counted as step time
and a missing peer would surface as a hang mid-step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DISPATCHERS = ("flat", "hierarchical")


@dataclass
class ParallelLayout:
    """Sizes, this process's coordinates and its process groups (None groups in a single process)."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    gpus_per_node: int = 1
    dispatcher: str = "flat"
    rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    mesh: Optional[DeviceMesh] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    dense_grad_group: Optional[dist.ProcessGroup] = None

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def ranks_per_ep_node(self) -> int:
        """EP ranks per node: gpus_per_node, or ep when the whole EP group fits in one node."""
        return min(self.gpus_per_node, self.ep)

    @property
    def ep_nodes(self) -> int:
        """Number of nodes the EP group spans."""
        return self.ep // self.ranks_per_ep_node

    @property
    def expert_grad_group(self) -> Optional[dist.ProcessGroup]:
        """Ranks holding the same experts (the data-parallel replicas of this EP rank)."""
        return self.dp_group

    def node_of(self, ep_rank: int) -> int:
        """Node (within the EP group) of an EP rank."""
        return ep_rank // self.ranks_per_ep_node

    def local_index(self, ep_rank: int) -> int:
        """Index of an EP rank inside its node."""
        return ep_rank % self.ranks_per_ep_node

    def expert_range(self, n_routed_experts: int, ep_rank: Optional[int] = None) -> range:
        """Global ids of the experts an EP rank holds (this rank's by default)."""
        per_rank = n_routed_experts // self.ep
        r = self.ep_rank if ep_rank is None else ep_rank
        return range(r * per_rank, (r + 1) * per_rank)


def check_layout(world_size: int, *, pp: int = 1, dp: Optional[int] = None, ep: int = 1,
                 gpus_per_node: Optional[int] = None, dispatcher: Optional[str] = None,
                 n_routed_experts: Optional[int] = None, n_group: Optional[int] = None) -> ParallelLayout:
    """Validate the sizes (rules in the module docstring) and resolve the defaults; no process groups.

    gpus_per_node defaults to $LOCAL_WORLD_SIZE (set by torchrun), else the world size; dispatcher
    defaults to hierarchical when the EP group spans several nodes, else flat.
    """
    for name, value in (("parallel.pp", pp), ("parallel.ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if dp is None:
        if world_size % (pp * ep):
            raise ValueError(f"world size {world_size} is not divisible by parallel.pp x parallel.ep = "
                             f"{pp} x {ep}; choose sizes whose product divides the number of processes")
        dp = world_size // (pp * ep)
    if not isinstance(dp, int) or dp < 1 or pp * dp * ep != world_size:
        raise ValueError(f"parallel.pp x parallel.dp x parallel.ep = {pp} x {dp} x {ep} must equal the "
                         f"world size {world_size}")
    if gpus_per_node is None:
        gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"parallel.gpus_per_node must be a positive integer, got {gpus_per_node!r}")
    if n_routed_experts is not None and ep > 1 and n_routed_experts % ep:
        raise ValueError(f"model.n_routed_experts ({n_routed_experts}) must be divisible by parallel.ep "
                         f"({ep}): every EP rank holds the same number of experts")
    if ep <= gpus_per_node and gpus_per_node % ep:
        raise ValueError(f"parallel.gpus_per_node ({gpus_per_node}) must be a multiple of parallel.ep ({ep}) "
                         f"when the EP group fits in one node, else EP groups straddle nodes")
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"parallel.ep ({ep}) must be a multiple of parallel.gpus_per_node ({gpus_per_node}) "
                         f"when the EP group spans several nodes")
    layout = ParallelLayout(pp=pp, dp=dp, ep=ep, gpus_per_node=gpus_per_node)
    if dispatcher is None:
        dispatcher = "hierarchical" if layout.ep_nodes > 1 else "flat"
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"parallel.dispatcher must be one of {DISPATCHERS}, got {dispatcher!r}")
    if dispatcher == "hierarchical" and layout.ep_nodes > 1 and n_group is not None and n_group % layout.ep_nodes:
        raise ValueError(
            f"model.n_group ({n_group}) must be a multiple of the number of EP nodes ({layout.ep_nodes} = "
            f"parallel.ep {ep} / parallel.gpus_per_node {gpus_per_node}) for parallel.dispatcher=hierarchical: "
            f"node-limited routing needs every router group inside one node so a token reaches at most "
            f"model.topk_group nodes (n_group = {layout.ep_nodes} makes group == node); or use "
            f"parallel.dispatcher=flat")
    layout.dispatcher = dispatcher
    return layout


def build_layout(*, pp: int = 1, dp: Optional[int] = None, ep: int = 1, gpus_per_node: Optional[int] = None,
                 dispatcher: Optional[str] = None, n_routed_experts: Optional[int] = None,
                 n_group: Optional[int] = None, device_type: str = "cpu") -> ParallelLayout:
    """Check the layout against the running world and create the mesh and its process groups.

    Without an initialized process group the world is one process and every group is None.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = check_layout(world, pp=pp, dp=dp, ep=ep, gpus_per_node=gpus_per_node, dispatcher=dispatcher,
                          n_routed_experts=n_routed_experts, n_group=n_group)
    if not dist.is_initialized():
        return layout
    mesh = init_device_mesh(device_type, (layout.pp, layout.dp, layout.ep), mesh_dim_names=("pp", "dp", "ep"))
    layout.mesh = mesh
    layout.rank = dist.get_rank()
    layout.pp_rank, layout.dp_rank, layout.ep_rank = (mesh[d].get_local_rank() for d in ("pp", "dp", "ep"))
    layout.pp_group, layout.dp_group, layout.ep_group = (mesh[d].get_group() for d in ("pp", "dp", "ep"))
    layout.dense_grad_group = mesh["dp", "ep"]._flatten("dp_ep").get_group()
    connect_groups(layout, device_type)
    return layout


def connect_groups(layout: ParallelLayout, device_type: str) -> None:
    """One all-reduce of a 1-element tensor over each process group of `layout`, in a fixed order on
    every rank: NCCL builds the communicators now instead of lazily during the first step."""
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    seen = set()
    for group in (layout.pp_group, layout.dp_group, layout.ep_group, layout.dense_grad_group):
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        dist.all_reduce(torch.zeros(1, device=device), group=group)
