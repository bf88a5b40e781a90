"""ZeRO-1 data parallelism: optimizer state and fp32 master weights sharded over data-parallel ranks.

DeepSeek-V3 section 3.2 trains with ZeRO-1 (Rajbhandari et al. 2020, stage P_os): each
data-parallel rank keeps the optimizer state of 1/N of the parameters, gradients are
reduce-scattered, each rank updates its shard and the updated parameters are all-gathered.

Why not DeepSpeed's ZeRO-1 here: `DeepSpeedZeroOptimizer` replaces the client optimizer's
parameter groups with flat fp32 partitions. The trainer's AdamW (bf16 moments, state allocated per
named parameter, checkpointed by name) then fails at its first step (KeyError 'exp_avg', verified
with deepspeed 0.19.8), its checkpoint would be DeepSpeed's flat format, which cannot be resharded
to another dp size without an offline conversion, and DeepSpeed's expert groups come from its own
global registry instead of our (pp, dp, ep) mesh; gradients from torch.distributed.pipelining are
also produced outside `engine.backward`. This module implements the same algorithm directly.

Sharding. Every parameter is split along one dimension into torch.chunk pieces (the DTensor
`Shard` rule: ceil(n / N) rows per rank, the last ranks possibly fewer or none):
- dense parameters (replicated on the dp x ep ranks of a pipeline stage) along dim 0 over dp x ep;
- routed-expert tensors (already split over ep on dim 0, replicated over dp) along dim 1 over dp.
The inner optimizer (any `named_params -> Optimizer` factory, e.g. the trainer's AdamW) sees one
"shard parameter" per parameter: a view of this rank's slice with the parameter's name and rank,
so name/ndim rules (no weight decay on norms) still hold and its state is 1/N of the full state.

Gradient averaging follows `parallel.expert_parallel.reduce_gradients`: dense gradients are the
mean over dp x ep, expert gradients the sum over dp divided by dp x ep.

Checkpoints. `state_dict()` is the inner optimizer's per-name state with each shard wrapped as a
DTensor (dense: Shard(0) on the flattened dp x ep mesh; experts: Shard(0) over ep and Shard(1) over
dp), so torch.distributed.checkpoint saves it with global shapes and loads it into any dp / ep
layout, or into the unsharded optimizer of a single process.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import is_expert_param
from .mesh import ParallelLayout

_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def chunk_range(n: int, parts: int, index: int) -> Tuple[int, int]:
    """[start, end) of piece `index` when n is split torch.chunk-style into `parts` (may be empty)."""
    size = -(-n // parts) if n else 0
    start = min(n, index * size)
    return start, min(n, start + size)


class _ShardGroup:
    """Parameters sharded along `dim` over one process group; packs reduce-scatter / all-gather buffers."""

    def __init__(self, params: List[nn.Parameter], dim: int, group: Optional[dist.ProcessGroup]):
        self.params, self.dim, self.group = params, dim, group
        self.device = params[0].device if params else torch.device("cpu")
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.piece = [self._piece_shape(p) for p in params]
        self.piece_numel = [int(torch.Size(s).numel()) for s in self.piece]
        self.length = sum(self.piece_numel)

    def _piece_shape(self, p: torch.Tensor) -> torch.Size:
        shape = list(p.shape)
        shape[self.dim] = -(-shape[self.dim] // self.size) if shape[self.dim] else 0
        return torch.Size(shape)

    def local_slice(self, t: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        start, end = chunk_range(t.shape[self.dim], self.size, self.rank if rank is None else rank)
        return t.narrow(self.dim, start, end - start)

    def _pad_into(self, out: torch.Tensor, src: torch.Tensor, shape: torch.Size) -> None:
        view = out.view(shape)
        view.zero_()
        view.narrow(self.dim, 0, src.shape[self.dim]).copy_(src)

    @torch.no_grad()
    def reduce_scatter(self, grads: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
        """Sum of every rank's gradients, this rank's pieces only (one reduce-scatter)."""
        send = torch.empty(self.size, self.length, dtype=dtype, device=self.device)
        for r in range(self.size):
            offset = 0
            for g, shape, numel in zip(grads, self.piece, self.piece_numel):
                self._pad_into(send[r, offset:offset + numel], self.local_slice(g, r), shape)
                offset += numel
        recv = torch.empty(self.length, dtype=dtype, device=self.device)
        if self.group is None:
            recv.copy_(send[0])
        else:
            _REDUCE_SCATTER(recv, send.view(-1), group=self.group)
        out, offset = [], 0
        for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
            piece = recv[offset:offset + numel].view(shape)
            start, end = chunk_range(p.shape[self.dim], self.size, self.rank)
            out.append(piece.narrow(self.dim, 0, end - start))
            offset += numel
        return out

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Write every rank's updated pieces back into the full parameters (one all-gather)."""
        if self.group is None or self.size == 1 or not self.params:
            return
        dtype = self.params[0].dtype
        send = torch.empty(self.length, dtype=dtype, device=self.device)
        offset = 0
        for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
            self._pad_into(send[offset:offset + numel], self.local_slice(p.data), shape)
            offset += numel
        recv = torch.empty(self.size, self.length, dtype=dtype, device=self.device)
        _ALL_GATHER(recv.view(-1), send, group=self.group)
        for r in range(self.size):
            offset = 0
            for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
                target = self.local_slice(p.data, r)
                target.copy_(recv[r, offset:offset + numel].view(shape).narrow(self.dim, 0, target.shape[self.dim]))
                offset += numel


class Zero1:
    """ZeRO-1 around an inner optimizer built by `make_optimizer(named_shard_params)`.

    Per step: `reduce_gradients()` (after the backward), optionally `grad_norm()` / `clip_grads()`,
    `step()` (inner update of this rank's shards, then all-gather of the parameters), `zero_grad()`.
    """

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], layout: ParallelLayout,
                 make_optimizer: Callable[[List[Tuple[str, nn.Parameter]]], torch.optim.Optimizer],
                 is_expert: Callable[[str], bool] = is_expert_param):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.layout = layout
        self.names = [n for n, _ in named]
        self.expert = [is_expert(n) and layout.ep > 1 for n in self.names]
        self.params = [p for _, p in named]
        self.dense = _ShardGroup([p for p, e in zip(self.params, self.expert) if not e], 0, layout.dense_grad_group)
        self.experts = _ShardGroup([p for p, e in zip(self.params, self.expert) if e], 1, layout.dp_group)
        self.replicas = layout.dp * layout.ep
        self.shards: List[nn.Parameter] = []
        for p, e in zip(self.params, self.expert):
            self.shards.append(nn.Parameter((self.experts if e else self.dense).local_slice(p.data)))
        self.optimizer = make_optimizer(list(zip(self.names, self.shards)))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _split(self, items: List[Any]) -> Tuple[List[Any], List[Any]]:
        dense = [x for x, e in zip(items, self.expert) if not e]
        expert = [x for x, e in zip(items, self.expert) if e]
        return dense, expert

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter the parameters' gradients into the shard parameters' .grad (averaged).

        Missing gradients count as zeros so every rank joins the collectives; the full .grad of the
        parameters is released afterwards (only the shards are kept).
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dense_g, expert_g = self._split(grads)
        dense_s, expert_s = self._split(self.shards)
        for group, g, shards in ((self.dense, dense_g, dense_s), (self.experts, expert_g, expert_s)):
            if not shards:
                continue
            for shard, piece in zip(shards, group.reduce_scatter(g, torch.float32)):
                shard.grad = (piece / self.replicas).to(shard.dtype)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm (fp64) of the whole model's averaged gradient: every element is held by exactly one rank."""
        sq = torch.zeros((), dtype=torch.float64, device=self.params[0].device if self.params else "cpu")
        for s in self.shards:
            if s.grad is not None and s.grad.numel():
                sq += s.grad.double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grads(self, max_norm: float, total_norm: float) -> None:
        """Scale the shard gradients by max_norm / total_norm when the norm is larger (0 disables)."""
        coef = max_norm / (total_norm + 1e-6)
        if max_norm > 0 and coef < 1.0:
            for s in self.shards:
                if s.grad is not None:
                    s.grad.mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards with the inner optimizer, then all-gather the full parameters."""
        self.optimizer.step()
        self.dense.all_gather_params()
        self.experts.all_gather_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in self.params + self.shards:
            t.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (tensors in the inner optimizer's state)."""
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))

    # ---- checkpoints --------------------------------------------------------------------------
    def _placement(self, index: int):
        from torch.distributed.tensor import Shard

        mesh = self.layout.mesh
        if self.expert[index]:
            return mesh["dp", "ep"], [Shard(1), Shard(0)]
        return mesh["dp", "ep"]._flatten("dp_ep"), [Shard(0)]

    def _global_shape(self, index: int, local: torch.Tensor) -> torch.Size:
        shape = list(self.params[index].shape)
        if self.expert[index]:
            shape[0] *= self.layout.ep
        return torch.Size(shape) if local.dim() == len(shape) else local.shape

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's per-name state dict, shards wrapped as DTensors (see module docstring)."""
        state = self.optimizer.state_dict()
        if self.layout.mesh is None:
            return state
        from torch.distributed.tensor import DTensor

        index = {n: i for i, n in enumerate(self.names)}

        def wrap(value: Any, name: Optional[str]) -> Any:
            if isinstance(value, dict):
                return {k: wrap(v, k if k in index else name) for k, v in value.items()}
            if isinstance(value, torch.Tensor) and name is not None and value.dim() > 0:
                i = index[name]
                mesh, placements = self._placement(i)
                shape = self._global_shape(i, value)
                return DTensor.from_local(value, mesh, placements, run_check=False, shape=shape,
                                          stride=_contiguous_stride(shape))
            return value

        return wrap(state, None)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Load a state produced by `state_dict` (after torch.distributed.checkpoint filled it)."""
        from torch.distributed.tensor import DTensor

        def unwrap(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: unwrap(v) for k, v in value.items()}
            return value.to_local() if isinstance(value, DTensor) else value

        self.optimizer.load_state_dict(unwrap(state))


def _contiguous_stride(shape: torch.Size) -> Tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))
