"""Gradient reduction in buckets launched during the backward pass, as PyTorch DDP does.

DeepSeek-V3 section 3.2 (ZeRO-1 data parallelism, communication overlapped with computation).
Parameters are grouped into buckets of at most `BUCKET_ELEMENTS` elements, in reverse order of the
model's parameters (the order in which backward produces their gradients), never mixing two
reduction groups (dense / expert). A hook after each parameter's gradient accumulation counts the
backward passes that reached it; once every parameter of a bucket has received the step's last one
(`expect(n)`: n backward passes per step, one per micro-batch; a parameter shared by several
pipeline stages of this rank gets one addition per stage and pass), the bucket's collective is started
asynchronously (an all-reduce, or ZeRO-1's reduce-scatter) while backward goes on. Buckets are
started strictly in bucket order, so every rank issues the same collectives in the same order.
The zero-bubble pipeline schedules (ZB-V, DualPipeV) add some weight gradients outside autograd's
accumulation (`grad += dw`), which no hook sees: they run those steps inside
`added_outside_autograd(params)`, which counts every parameter whose gradient changed there without a
hook. `finish()` (before the optimizer) starts what is left (parameters unused in this step), waits for
every bucket and writes the results. Without `expect` nothing starts early: `finish()` then reduces
everything, bucket by bucket, as a blocking reduction would.

A gradient changed after its bucket started would be lost: a hook that fires after that raises.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 1 << 22  # 16 MiB of fp32 per bucket (DDP: 25 MB)


def make_buckets(sizes: Sequence[int], kinds: Sequence[Any], cap: int) -> List[List[int]]:
    """Indices of parameters (given in model order) grouped into buckets: reverse order, consecutive
    parameters of the same kind, at most `cap` elements each (a larger parameter gets its own)."""
    buckets: List[List[int]] = []
    size = 0
    for i in reversed(range(len(sizes))):
        if buckets and kinds[buckets[-1][-1]] == kinds[i] and size + sizes[i] <= cap:
            buckets[-1].append(i)
            size += sizes[i]
        else:
            buckets.append([i])
            size = sizes[i]
    return buckets


class BucketedReduction:
    """Buckets of `params` reduced during backward (module docstring).

    `start(bucket_index, param_indices)` starts the collective of one bucket and returns an object
    whose `finish()` waits for it and writes the result; `kinds[i]` names the reduction group of
    parameter i (buckets never mix kinds); `cap` defaults to BUCKET_ELEMENTS.
    """

    def __init__(self, params: Sequence[nn.Parameter], kinds: Sequence[Any],
                 start: Callable[[int, List[int]], Any], cap: Optional[int] = None):
        self.start_bucket = start
        self.buckets = make_buckets([p.numel() for p in params], kinds, cap or BUCKET_ELEMENTS)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.expected: Optional[List[int]] = None
        self.seen: Dict[int, int] = {}
        self.complete = [0] * len(self.buckets)
        self.pending: List[Any] = []
        self.params = list(params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self._hooked: Optional[Set[int]] = None
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._accumulated(i))

    @property
    def started(self) -> int:
        """Buckets started in this step so far."""
        return len(self.pending)

    def expect(self, backwards: int, uses: Optional[Mapping[int, int]] = None) -> None:
        """This step runs `backwards` backward passes: start each bucket after its last one. `uses`
        (id(parameter) -> count, default 1) says how many gradient additions each backward pass
        makes to a parameter that several separately differentiated parts share (e.g. the embedding of
        the first pipeline stage and of the MTP module on the last stage of a V-shaped schedule)."""
        uses = uses or {}
        self.expected = [backwards * uses.get(id(p), 1) for p in self.params]
        self.seen = {}
        self.complete = [0] * len(self.buckets)

    @contextlib.contextmanager
    def added_outside_autograd(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """Around a step that may add gradients to `params` without autograd's accumulation (a
        zero-bubble schedule's weight step): each of them whose `.grad` changed (replaced or written in
        place) and whose hook did not fire meanwhile counts as one backward pass reaching it."""
        watched = [self.index[id(p)] for p in params if id(p) in self.index]
        before = {i: _grad_identity(self.params[i]) for i in watched}
        self._hooked = set()
        try:
            yield
        finally:
            hooked, self._hooked = self._hooked, None
        for i in watched:
            if i not in hooked and _grad_identity(self.params[i]) != before[i]:
                self._accumulated(i)

    def _accumulated(self, index: int) -> None:
        if self._hooked is not None:
            self._hooked.add(index)
        if self.expected is None:
            return
        bucket = self.bucket_of[index]
        if bucket < self.started:
            raise RuntimeError(f"a gradient was accumulated after its bucket's reduction started (more than "
                               f"{self.expected[index]} gradient additions to parameter {index} this step?)")
        self.seen[index] = self.seen.get(index, 0) + 1
        if self.seen[index] == self.expected[index]:
            self.complete[bucket] += 1
            while self.started < len(self.buckets) and \
                    self.complete[self.started] == len(self.buckets[self.started]):
                self._start_next()

    def _start_next(self) -> None:
        b = self.started
        self.pending.append(self.start_bucket(b, self.buckets[b]))

    @torch.no_grad()
    def finish(self) -> None:
        """Start the buckets not started yet, wait for all, write the results; ready for the next step."""
        while self.started < len(self.buckets):
            self._start_next()
        for work in self.pending:
            work.finish()
        self.pending, self.expected, self.seen = [], None, {}
        self.complete = [0] * len(self.buckets)


def _grad_identity(p: nn.Parameter) -> Optional[tuple]:
    """What changes when `p.grad` is replaced or written in place (None without a gradient)."""
    return None if p.grad is None else (id(p.grad), p.grad._version)


class AllReduceBucket:
    """One bucket's gradients summed over `group` and multiplied by `scale`, in place: one fp32
    all-reduce of their concatenation, started at construction (`finish()` waits and writes back).
    Without a group (or a group of one) the gradients are only scaled, in their own dtype."""

    def __init__(self, grads: List[torch.Tensor], group: Optional[dist.ProcessGroup], scale: float):
        self.grads, self.scale = grads, scale
        self.flat = self.work = None
        if group is not None and dist.get_world_size(group) > 1:
            self.flat = torch.cat([g.reshape(-1).float() for g in grads])
            self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        if self.work is None:
            for g in self.grads:
                g.mul_(self.scale)
            return
        self.work.wait()
        self.flat.mul_(self.scale)
        offset = 0
        for g in self.grads:
            g.copy_(self.flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
