"""Expert parallelism for a built Transformer: keep this rank's experts, reduce gradients, share load.

DeepSeek-V3 section 3.2 (EP over nodes) and 2.1.2 (the bias update uses the expert load of the whole
batch). Each EP rank keeps the contiguous slice [r * E/ep, (r + 1) * E/ep) of every MoE layer's routed
experts and hands tokens to a distributed dispatcher (`parallel/dispatch.py`); everything else
(attention, router, shared expert, dense layers, embedding, head) stays replicated.

Gradient averaging. Every rank of dp x ep sees its own micro-batch and the loss of a step is the mean
of the dp * ep per-rank losses. A dense gradient is therefore the mean over dp x ep. An expert's
gradient already holds, thanks to the all-to-all, the contributions of all ep ranks' tokens, so it is
*summed* over the dp replicas that hold the same expert and divided by dp * ep (a plain mean over dp
would count the ep ranks' tokens ep times too much).

Checkpoints. Expert tensors (and their optimizer state) are saved as DTensors sharded on dim 0 over
the EP mesh dimension: DCP records each rank's chunk with its global offset in a tensor of global
shape [E, ...], so the same checkpoint loads with any ep (a plain tensor when ep=1 reads the whole
thing, a DTensor with another ep reads its own slice) and the HF export sees every expert.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from model.init import materialized_device
from model.transformer import Transformer

from .dispatch import ExpertParallelDispatcher, make_dispatcher
from .grad_buckets import AllReduceBucket, BucketedReduction, make_buckets
from .mesh import ParallelLayout

EXPERT_KEY = ".mlp.experts."


def is_expert_param(name: str) -> bool:
    """Routed-expert tensors (`layers.<i>.mlp.experts.*`, also inside MTP blocks); shared experts are dense."""
    return EXPERT_KEY in name


@torch.no_grad()
def keep_expert_slice(model: Transformer, ep_rank: int, ep: int) -> Transformer:
    """Keep only rows [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE's routed experts.

    The expert module stays the same object (same class, e.g. the FP8 experts of `model/fp8.py`);
    its stacked weights are replaced by copies of its rows (on the meta device: by meta tensors of
    the slice's shape, nothing is allocated) and `expert_offset` records the first global expert,
    so the full tensors are freed. Experts that already hold this slice are left as they are.
    Build the optimizer afterwards.
    """
    for moe in model.moe_layers():
        experts, total = moe.experts, moe.gate.n_experts
        if total % ep:
            raise ValueError(f"model.n_routed_experts ({total}) must be divisible by parallel.ep ({ep})")
        per_rank = total // ep
        if experts.num_experts == per_rank and experts.expert_offset == ep_rank * per_rank:
            continue
        if experts.num_experts != total:
            raise ValueError(f"experts already sharded as {experts.num_experts} from {experts.expert_offset}; "
                             f"cannot keep slice {ep_rank} of {ep}")
        rows = slice(ep_rank * per_rank, (ep_rank + 1) * per_rank)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full[rows].clone(), requires_grad=full.requires_grad))
        experts.num_experts, experts.expert_offset = per_rank, ep_rank * per_rank
    return model


def shard_experts(model: Transformer, ep_rank: int, ep: int, dispatcher: Callable) -> Transformer:
    """`keep_expert_slice` and install `dispatcher` in every MoE layer."""
    keep_expert_slice(model, ep_rank, ep)
    for moe in model.moe_layers():
        moe.dispatcher = dispatcher
    return model


def apply_expert_parallel(model: Transformer, layout: ParallelLayout, dispatcher: Callable) -> Transformer:
    """`shard_experts` with this process's EP coordinates; the model is left unchanged when ep = 1."""
    if layout.ep == 1:
        return model
    return shard_experts(model, layout.ep_rank, layout.ep, dispatcher)


@torch.no_grad()
def global_expert_load(model: Transformer, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-layer expert load [n_moe_layers, E] summed over the ranks of `group` (the dense-grad group:
    every rank that routes its own tokens), for `model.update_router_bias(gamma, load)`."""
    load = model.expert_load().clone()
    if group is not None and load.numel():
        dist.all_reduce(load, group=group)
    return load


BUCKET_ELEMENTS = 1 << 24


def _all_reduce_flat(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup], scale: float) -> None:
    """Sum `grads` over `group` and multiply by `scale`, in place, one fp32 bucket of at most
    BUCKET_ELEMENTS elements (or one tensor when larger) after the other (`grad_buckets.make_buckets`),
    so the transient copy stays a bucket rather than all gradients; scaled in place without a copy when
    the group is this rank alone."""
    for bucket in make_buckets([g.numel() for g in grads], [None] * len(grads), BUCKET_ELEMENTS):
        AllReduceBucket([grads[i] for i in bucket], group, scale).finish()


@torch.no_grad()
def reduce_gradients(named_params: Iterable, layout: ParallelLayout) -> None:
    """Average gradients as explained in the module docstring: dense over dp x ep, experts over dp
    (summed, then / (dp * ep)). Missing gradients are treated as zeros so every rank joins."""
    dense, expert = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else dense).append(p.grad)
    replicas = layout.dp * layout.ep
    _all_reduce_flat(dense, layout.dense_grad_group, 1.0 / replicas)
    _all_reduce_flat(expert, layout.expert_grad_group, 1.0 / replicas)


class GradientAllReduce:
    """The gradients of `named_params` averaged as `reduce_gradients` does, in buckets all-reduced
    during the backward pass (`parallel/grad_buckets.py`): `expect_backwards(n)` before a step of n
    backward passes, `reduce_gradients()` after it; `added_outside_autograd(params)` wraps a
    zero-bubble schedule's weight step (gradients added without autograd's hooks)."""

    def __init__(self, named_params: Iterable, layout: ParallelLayout):
        self.layout = layout
        named = list(named_params)
        self.params = [p for _, p in named]
        self.expert = [is_expert_param(n) for n, _ in named]
        self.buckets = BucketedReduction(self.params, self.expert, self._start_bucket)

    def _start_bucket(self, _bucket: int, indices: List[int]) -> AllReduceBucket:
        for i in indices:
            if self.params[i].grad is None:
                self.params[i].grad = torch.zeros_like(self.params[i])
        group = self.layout.expert_grad_group if self.expert[indices[0]] else self.layout.dense_grad_group
        return AllReduceBucket([self.params[i].grad for i in indices], group,
                               1.0 / (self.layout.dp * self.layout.ep))

    def expect_backwards(self, n: int, uses: Optional[Dict[int, int]] = None) -> None:
        """This step runs `n` backward passes (micro-batches): buckets start after the last one.
        `uses`: additions per pass of shared parameters (`grad_buckets.BucketedReduction.expect`)."""
        self.buckets.expect(n, uses)

    def added_outside_autograd(self, params: Iterable[nn.Parameter]) -> ContextManager[None]:
        """Around a zero-bubble schedule's weight step: count the gradients it adds without autograd's
        hooks (`grad_buckets.BucketedReduction.added_outside_autograd`)."""
        return self.buckets.added_outside_autograd(params)

    def reduce_gradients(self) -> None:
        """Start what is left, wait for every bucket, write the averaged gradients."""
        self.buckets.finish()


def shard_expert_state(state: Dict[str, Any], layout: ParallelLayout,
                       is_expert: Callable[[str], bool] = is_expert_param) -> Dict[str, Any]:
    """Wrap the expert tensors of a (nested) state dict as DTensors Shard(0) over the EP mesh dim.

    The DTensors share storage with the local tensors, so `dcp.load` into the result fills them in
    place. Keys are matched with `is_expert` on the full dotted path. Unchanged when ep == 1.
    """
    if layout.ep == 1 or layout.mesh is None:
        return state
    from torch.distributed.tensor import DTensor, Shard

    ep_mesh = layout.mesh["ep"]

    def wrap(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {k: wrap(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.dim() > 0 and is_expert(path):
            return DTensor.from_local(value, ep_mesh, [Shard(0)], run_check=False)
        return value

    return wrap(state, "")


def local_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `shard_expert_state`: DTensors replaced by their local shards (same storage)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: local_state(v) for k, v in state.items()}
    return state.to_local() if isinstance(state, DTensor) else state


@torch.no_grad()
def param_grad_norms(named: List[Tuple[str, torch.Tensor]], layout: ParallelLayout) -> torch.Tensor:
    """fp64 norm of the gradient of every (name, parameter) of `named` (all have one), in that order;
    with ep > 1 an expert tensor's norm combines the squared norms of its EP shards (all-reduced over
    the EP group, whose ranks hold the same names)."""
    norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for _, p in named])
    if layout.ep > 1:
        expert = torch.tensor([is_expert_param(n) for n, _ in named], device=norms.device)
        squares = torch.where(expert, norms.square(), torch.zeros_like(norms))
        dist.all_reduce(squares, group=layout.ep_group)
        norms = torch.where(expert, squares.sqrt(), norms)
    return norms


class ExpertParallel:
    """What a training loop needs for expert parallelism, built on a `Transformer` (full, or holding
    this rank's slice of the experts already, e.g. from `parallel.rank_model.build_rank_model`).

    Construction shards the experts (when not yet done) and installs the dispatcher (`layout.dispatcher`, FP8 payload
    when `fp8`). Per step: `reduce_gradients`, `grad_norm` (global: the expert part is summed over
    the EP group, where each rank holds other experts), `expert_load` (summed over every rank that
    routes tokens); `traffic()` returns and resets the bytes sent by all ranks since the last call;
    `checkpoint_state` / `local_state` wrap and unwrap the expert tensors for DCP. Gradients are reduced
    in buckets started during backward (`parallel/grad_buckets.py`) once `expect_backwards(n)` says
    how many backward passes the step runs; `reduce_gradients()` finishes them.
    """

    def __init__(self, model: Transformer, layout: ParallelLayout, fp8: bool = False):
        self.model, self.layout = model, layout
        self.dispatcher: ExpertParallelDispatcher = make_dispatcher(layout.dispatcher, layout.ep_group,
                                                                    layout.ranks_per_ep_node, fp8=fp8)
        shard_experts(model, layout.ep_rank, layout.ep, self.dispatcher)
        self.device = materialized_device(model)
        self.gradients = GradientAllReduce([(n, p) for n, p in model.named_parameters() if p.requires_grad], layout)

    def expect_backwards(self, n: int) -> None:
        """This step runs `n` backward passes (micro-batches): buckets start after the last one."""
        self.gradients.expect_backwards(n)

    def reduce_gradients(self) -> None:
        """Average the gradients as `reduce_gradients` does (buckets started during backward finished)."""
        self.gradients.reduce_gradients()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm (fp64) of the whole model's gradient after `reduce_gradients`, computed as one process
        does (`training.optim.grad_norm`: the norm of the per-parameter fp64 norms, in parameter order);
        inf/nan propagate."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        return torch.linalg.vector_norm(param_grad_norms(named, self.layout))

    @torch.no_grad()
    def expert_load(self) -> torch.Tensor:
        return global_expert_load(self.model, self.layout.dense_grad_group)

    def traffic(self) -> Dict[str, float]:
        """{"a2a_internode_bytes", "a2a_intranode_bytes"}: forward-pass payload bytes sent by all
        ranks of the dp x ep group since the last call (collective); resets the counters."""
        d = self.dispatcher
        sent = torch.tensor([d.a2a_internode_bytes, d.a2a_intranode_bytes], dtype=torch.float64,
                            device=self.device)
        dist.all_reduce(sent, group=self.layout.dense_grad_group)
        d.reset_traffic()
        return {"a2a_internode_bytes": float(sent[0]), "a2a_intranode_bytes": float(sent[1])}

    def checkpoint_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        return shard_expert_state(state, self.layout)

    @staticmethod
    def local_state(state: Dict[str, Any]) -> Dict[str, Any]:
        return local_state(state)

