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
mean over dp x ep, expert gradients the sum over dp divided by dp x ep. The reduce-scatters run in
buckets started during the backward pass (`parallel/grad_buckets.py`, as DDP does) once
`expect_backwards(n)` says how many backward passes the step runs; `reduce_gradients()` finishes them.

Master weights (DeepSeek-V3 section 3.3.2: bf16 parameters in the model, fp32 master weights and
gradients in the optimizer). A parameter that is not fp32, or every parameter when the state is
offloaded, gets a separate fp32 master copy of its shard: that copy is the inner optimizer's
parameter, the model's parameter is rewritten from it (cast) after each step. fp32 parameters
without offload are their own master weights (the shard parameter is a view of them).

Gradient dtypes (what a memory estimate counts). fp32 parameters: autograd accumulates their
gradients in fp32 `.grad` (full size, on the device). Other parameters: a hook adds each backward's
gradient into an fp32 buffer of the parameter's full size on the device, so micro-batches
accumulate in fp32; the bf16 `.grad` exists only transiently, one parameter at a time (the
zero-bubble pipeline schedules, which add weight gradients with `grad += dw` outside autograd's
accumulation, keep a bf16 `.grad` per parameter until the step as well). The reduced gradient of this
rank's shard is fp32: on the device, and with offload also in a (pinned) host buffer of the shard's
size. The full-size buffers are released after the reduce-scatter.

Offload (`offload=True`, training/cpu_adam.py): the fp32 master shard, both moments and the shard's
gradient live in host memory (pinned when the device is a GPU). The step copies each shard gradient
to the host (non-blocking, all issued at once), then the inner optimizer updates one parameter after
the other, waiting for that parameter's gradient copy only, and each updated master goes back to
the device (non-blocking) while the next parameter is updated.

Unsharded (`shard=False`, `parallel.zero=false` with master weights or offload): the same machinery
with every rank holding the full state; gradients are all-reduced instead of reduce-scattered.

Checkpoints. `state_dict()` is the inner optimizer's per-name state with each shard wrapped as a
DTensor (dense: Shard(0) on the flattened dp x ep mesh; experts: Shard(0) over ep and Shard(1) over
dp), so torch.distributed.checkpoint saves it with global shapes and loads it into any dp / ep
layout, or into the unsharded optimizer of a single process. `master_state()` wraps the separate
master weights the same way; the trainer saves them as the model's weights, so a checkpoint always
holds fp32 weights, whatever the parameter dtype or offload setting of the run that wrote it.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import is_expert_param, local_state
from .grad_buckets import BucketedReduction
from .mesh import ParallelLayout
from .shard_group import ShardGroup



MOMENT_BYTES = {"bf16": 2, "fp32": 4}


def state_bytes_per_element(param_dtype: str, moments_dtype: str, offload: bool) -> Dict[str, int]:
    """{"device": B, "host": B}: bytes per element of a rank's shard that `Zero1` holds for the
    optimizer: the separate fp32 master weight (parameters that are not fp32, or any with offload),
    both moments (fp32 with offload: DeepSpeed's kernel) and, with offload, the host copy of the
    shard's fp32 gradient. The model's parameters and the fp32 gradients of the module docstring
    are not included."""
    master = 4 if offload or param_dtype != "fp32" else 0
    moments = 2 * MOMENT_BYTES["fp32" if offload else moments_dtype]
    if offload:
        return {"device": 0, "host": master + moments + 4}
    return {"device": master + moments, "host": 0}


class Zero1:
    """ZeRO-1 around an inner optimizer built by `make_optimizer(named_shard_params)`.

    Per step: `reduce_gradients()` (after the backward), optionally `grad_norm()` / `clip_grads()`,
    `step()` (inner update of this rank's shards, then all-gather of the parameters), `zero_grad()`.
    `shard=False` keeps whole state on every rank; `offload=True` keeps it in host memory, and the
    inner optimizer's `step(before=, after=)` then calls `before(p)` / `after(p)` around each
    parameter's update (see the module docstring).
    """

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], layout: ParallelLayout,
                 make_optimizer: Callable[[List[Tuple[str, nn.Parameter]]], torch.optim.Optimizer],
                 is_expert: Callable[[str], bool] = is_expert_param, *, shard: bool = True, offload: bool = False):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.layout, self.shard, self.offload = layout, shard, offload
        self.names = [n for n, _ in named]
        self.expert = [is_expert(n) and layout.ep > 1 for n in self.names]
        self.params = [p for _, p in named]
        self.dense = ShardGroup([p for p, e in zip(self.params, self.expert) if not e], 0,
                                 layout.dense_grad_group, shard)
        self.experts = ShardGroup([p for p, e in zip(self.params, self.expert) if e], 1, layout.dp_group, shard)
        self.replicas = layout.dp * layout.ep
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.pin = offload and self.device.type == "cuda"
        self.separate = [offload or p.dtype != torch.float32 for p in self.params]
        self.shards: List[nn.Parameter] = []
        for i, p in enumerate(self.params):
            view = self._group(i).local_slice(p.data)
            if self.separate[i]:
                master = torch.empty(view.shape, dtype=torch.float32, device="cpu" if offload else p.device,
                                     pin_memory=self.pin)
                view = master.copy_(view)
            self.shards.append(nn.Parameter(view))
        self.index = {id(s): i for i, s in enumerate(self.shards)}
        self.host_grads = [torch.empty_like(s, pin_memory=self.pin) for s in self.shards] if offload else []
        self.device_grads: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self.accumulated: Dict[int, torch.Tensor] = {}
        for i, p in enumerate(self.params):
            if p.dtype != torch.float32:
                self._accumulate_in_fp32(i, p)
        self.optimizer = make_optimizer(list(zip(self.names, self.shards)))
        self.buckets = BucketedReduction(self.params, self.expert, self._start_bucket)
        self.bucket_groups = [ShardGroup([self.params[i] for i in idx], *self._reduction(idx[0]), shard)
                              for idx in self.buckets.buckets]

    def _reduction(self, index: int):
        """(shard dim, process group) of parameter `index`'s reduction."""
        return (1, self.layout.dp_group) if self.expert[index] else (0, self.layout.dense_grad_group)

    def _group(self, index: int) -> ShardGroup:
        return self.experts if self.expert[index] else self.dense

    def _accumulate_in_fp32(self, index: int, p: nn.Parameter) -> None:
        """Add every backward's gradient of `p` into an fp32 buffer; drop the low-precision .grad."""
        def add(grad: torch.Tensor) -> None:
            acc = self.accumulated.get(index)
            if acc is None:
                self.accumulated[index] = grad.to(torch.float32, memory_format=torch.contiguous_format)
            else:
                acc.add_(grad)

        def drop(param: torch.Tensor) -> None:
            param.grad = None

        p.register_hook(add)
        p.register_post_accumulate_grad_hook(drop)

    def _full_grad(self, index: int) -> torch.Tensor:
        """This rank's fp32 gradient of parameter `index` before reduction (zeros when it got none)."""
        acc = self.accumulated.pop(index, None)
        if acc is not None:
            return acc
        p = self.params[index]
        if p.grad is not None and p.dtype == torch.float32:
            return p.grad
        return torch.zeros_like(p, dtype=torch.float32)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def expect_backwards(self, n: int, uses: Optional[Dict[int, int]] = None) -> None:
        """This step runs `n` backward passes (micro-batches): buckets start after the last one (when
        there is anything to communicate: on one process the gradients stay until `reduce_gradients`).
        `uses`: additions per pass of shared parameters (`grad_buckets.BucketedReduction.expect`)."""
        if any(g.group is not None and dist.get_world_size(g.group) > 1 for g in self.bucket_groups):
            self.buckets.expect(n, uses)

    def added_outside_autograd(self, params: Iterable[nn.Parameter]) -> ContextManager[None]:
        """Around a zero-bubble schedule's weight step: count the gradients it adds without autograd's
        hooks (`grad_buckets.BucketedReduction.added_outside_autograd`)."""
        return self.buckets.added_outside_autograd(params)

    def _start_bucket(self, bucket: int, indices: List[int]) -> "_ShardBucket":
        pending = self.bucket_groups[bucket].start_reduce_scatter([self._full_grad(i) for i in indices],
                                                                  torch.float32)
        for i in indices:
            self.params[i].grad = None
        return _ShardBucket(self, indices, pending)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter the parameters' fp32 gradients into the shards' gradients (averaged).

        Missing gradients count as zeros so every rank joins the collectives; the full gradients are
        released once their bucket started (only the shards' are kept: their .grad, or on the device
        until `step` copies them to the host when offloading).
        """
        self.buckets.finish()

    def _shard_grads(self) -> List[Optional[torch.Tensor]]:
        return self.device_grads if self.offload else [s.grad for s in self.shards]

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm (fp64) of the whole model's averaged gradient: every element counted once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, g in enumerate(self._shard_grads()):
            if g is not None and g.numel() and self._group(i).owner:
                sq += g.double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(sq)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grads(self, max_norm: float, total_norm: float) -> None:
        """Scale the shard gradients by max_norm / total_norm when the norm is larger (0 disables)."""
        coef = max_norm / (total_norm + 1e-6)
        if max_norm > 0 and coef < 1.0:
            for g in self._shard_grads():
                if g is not None:
                    g.mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards with the inner optimizer, write the separate master weights into
        the parameters, then all-gather the full parameters."""
        if self.offload:
            self._offloaded_step()
        else:
            self.optimizer.step()
            for i, separate in enumerate(self.separate):
                if separate:
                    self._group(i).local_slice(self.params[i].data).copy_(self.shards[i])
        self.dense.all_gather_params()
        self.experts.all_gather_params()

    def _offloaded_step(self) -> None:
        copied = []
        for i, grad in enumerate(self.device_grads):
            host = self.host_grads[i]
            if grad is None:
                host.zero_()
            else:
                host.copy_(grad, non_blocking=self.pin)
            self.shards[i].grad = host
            copied.append(_record_event(self.device))
        self.device_grads = [None] * len(self.params)

        def before(shard: torch.Tensor) -> None:
            event = copied[self.index[id(shard)]]
            if event is not None:
                event.synchronize()

        def after(shard: torch.Tensor) -> None:
            i = self.index[id(shard)]
            self._group(i).local_slice(self.params[i].data).copy_(shard, non_blocking=self.pin)

        self.optimizer.step(before=before, after=after)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in self.params + self.shards:
            t.grad = None
        self.accumulated.clear()
        self.device_grads = [None] * len(self.params)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (tensors in the inner optimizer's state)."""
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))

    # ---- checkpoints --------------------------------------------------------------------------
    def _wrap(self, index: int, value: torch.Tensor) -> Any:
        """`value` (a shard-shaped tensor of parameter `index`) as a DTensor of its global shape, or
        as it is where nothing is sharded (one process, or a dense tensor kept whole)."""
        mesh = self.layout.mesh
        if mesh is None or value.dim() == 0 or (not self.shard and not self.expert[index]):
            return value
        from torch.distributed.tensor import DTensor, Shard

        if not self.shard:
            mesh, placements = mesh["ep"], [Shard(0)]
        elif self.expert[index]:
            mesh, placements = mesh["dp", "ep"], [Shard(1), Shard(0)]
        else:
            mesh, placements = mesh["dp", "ep"]._flatten("dp_ep"), [Shard(0)]
        shape = list(self.params[index].shape)
        if self.expert[index]:
            shape[0] *= self.layout.ep
        shape = torch.Size(shape) if value.dim() == len(shape) else value.shape
        return DTensor.from_local(value, mesh, placements, run_check=False, shape=shape,
                                  stride=_contiguous_stride(shape))

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's per-name state dict, shards wrapped as DTensors (see module docstring)."""
        index = {n: i for i, n in enumerate(self.names)}

        def wrap(value: Any, name: Optional[str]) -> Any:
            if isinstance(value, dict):
                return {k: wrap(v, k if k in index else name) for k, v in value.items()}
            if isinstance(value, torch.Tensor) and name is not None:
                return self._wrap(index[name], value)
            return value

        return wrap(self.optimizer.state_dict(), None)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Load a state produced by `state_dict` (after torch.distributed.checkpoint filled it)."""
        self.optimizer.load_state_dict(local_state(state))

    def master_state(self) -> Dict[str, Any]:
        """{name: fp32 master shard (wrapped like `state_dict`)} of the parameters with separate masters."""
        return {n: self._wrap(i, s.detach()) for i, (n, s) in enumerate(zip(self.names, self.shards))
                if self.separate[i]}

    @torch.no_grad()
    def load_master_state(self, model_state: Dict[str, Any]) -> Dict[str, Any]:
        """Copy the master weights of `model_state` (filled from a `master_state()` layout) into the
        masters and the parameters (cast, all-gathered); returns `model_state` with those entries
        replaced by the live parameters, for the module's own load_state_dict."""
        out = dict(model_state)
        for i, (name, shard) in enumerate(zip(self.names, self.shards)):
            if self.separate[i]:
                shard.copy_(local_state(model_state[name]))
                self._group(i).local_slice(self.params[i].data).copy_(shard)
                out[name] = self.params[i].detach()
        self.dense.all_gather_params()
        self.experts.all_gather_params()
        return out


class _ShardBucket:
    """One bucket's reduce-scatter in flight; `finish()` gives its shards their averaged gradients."""

    def __init__(self, zero: Zero1, indices: List[int], pending):
        self.zero, self.indices, self.pending = zero, indices, pending

    def finish(self) -> None:
        zero = self.zero
        for i, piece in zip(self.indices, self.pending.result()):
            grad = piece.div_(zero.replicas)
            if zero.offload:
                zero.device_grads[i] = grad
            else:
                zero.shards[i].grad = grad


def _record_event(device: torch.device):
    """A CUDA event recorded on the current stream (None on other devices: their copies are synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _contiguous_stride(shape: torch.Size) -> Tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))
