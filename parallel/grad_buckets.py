"""Gradient reduction in buckets launched during the backward pass, as PyTorch DDP does.

DeepSeek-V3 section 3.2 (ZeRO-1 data parallelism, communication overlapped with computation).
Parameters are grouped into buckets of at most `BUCKET_ELEMENTS` elements, in reverse order of the
model's parameters (the order in which backward produces their gradients), never mixing two
reduction groups (dense / expert). A hook after each parameter's gradient accumulation counts the
backward passes that reached it; once every parameter of a bucket has received the step's last one
(`expect(n)`: n backward passes per step, one per micro-batch), the bucket's collective is started
asynchronously (an all-reduce, or ZeRO-1's reduce-scatter) while backward goes on. Buckets are
started strictly in bucket order, so every rank issues the same collectives in the same order.
`finish()` (before the optimizer) starts what is left (parameters no hook saw: unused in this step,
or whose weight gradients a zero-bubble schedule adds outside autograd's accumulation), waits for
every bucket and writes the results. Without `expect` nothing starts early: `finish()` then reduces
everything, bucket by bucket, as a blocking reduction would.

A gradient changed after its bucket started would be lost: a hook that fires after that raises.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

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
        self.expected: Optional[int] = None
        self.seen: Dict[int, int] = {}
        self.complete = [0] * len(self.buckets)
        self.pending: List[Any] = []
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._accumulated(i))

    @property
    def started(self) -> int:
        """Buckets started in this step so far."""
        return len(self.pending)

    def expect(self, backwards: int) -> None:
        """This step runs `backwards` backward passes: start each bucket after its last one."""
        self.expected, self.seen = backwards, {}
        self.complete = [0] * len(self.buckets)

    def _accumulated(self, index: int) -> None:
        if self.expected is None:
            return
        bucket = self.bucket_of[index]
        if bucket < self.started:
            raise RuntimeError(f"a gradient was accumulated after its bucket's reduction started (more than "
                               f"{self.expected} backward passes this step?)")
        self.seen[index] = self.seen.get(index, 0) + 1
        if self.seen[index] == self.expected:
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
