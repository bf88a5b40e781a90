"""How the model is spread over processes: the (pp, dp, ep) mesh, expert-parallel dispatch, sharding.

DeepSeek-V3 section 3 (training framework). `mesh.build_layout` makes the process groups,
`dispatch.make_dispatcher` the flat or hierarchical all-to-all dispatcher (asynchronous: `start` /
`MoEFlight.wait`, see `parallel/dispatch.py`), `grad_buckets` the gradient reduction started during
backward, and
`expert_parallel.ExpertParallel` keeps each rank's slice of the routed experts and does the
expert-aware gradient reduction, gradient norm, load sharing and checkpoint wrapping for a trainer.
"""
from .dispatch import FlatDispatcher, HierarchicalDispatcher, make_dispatcher
from .expert_parallel import (ExpertParallel, apply_expert_parallel, global_expert_load, is_expert_param,
                              local_state, reduce_gradients, shard_expert_state, shard_experts)
from .mesh import ParallelLayout, build_layout, check_layout

__all__ = ["FlatDispatcher", "HierarchicalDispatcher", "make_dispatcher", "ExpertParallel", "apply_expert_parallel",
           "global_expert_load", "is_expert_param", "local_state", "reduce_gradients", "shard_expert_state",
           "shard_experts", "ParallelLayout", "build_layout", "check_layout"]
