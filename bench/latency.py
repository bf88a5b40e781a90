"""Injected network latency for torch.distributed, to measure on CPU how much communication a
schedule hides behind computation (DeepSeek-V3 section 3.2.1: DualPipe overlaps the all-to-all of one
micro-batch with the computation of another).

`InjectedLatency(delay_s)` is a context manager for tests and benchmarks only. Inside it, every
collective and point-to-point operation of `torch.distributed` (all-to-all, all-reduce,
reduce-scatter, all-gather, their single-tensor forms `reduce_scatter_single` / `all_gather_single`
that ZeRO-1 uses, broadcast, send / recv and their asynchronous forms) completes no earlier
than `delay_s` after it was started:
- a blocking call runs the real operation, then sleeps for what is left of `delay_s`;
- an asynchronous call (`async_op=True`, `isend`, `irecv`, and so `batch_isend_irecv` on gloo)
  returns at once with a work handle whose `wait()` waits for the real operation, then sleeps until
  `delay_s` after the start.
Sleeping holds no CPU core, so computation issued between the start and the `wait()` hides the delay
exactly as it would hide a slow network. `counts` records how many operations of each kind started,
which gives the latency injected in total (operations x `delay_s`). Results are those of the real
operations, unchanged.
"""
from __future__ import annotations

import functools
import time
from collections import Counter
from typing import Any, Callable, Dict, Optional

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

ASYNC_BY_DEFAULT = ("isend", "irecv")
BLOCKING_OR_ASYNC = tuple(name for name in (
    "all_to_all_single", "all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor",
    "all_gather_single", "all_gather", "reduce_scatter", "broadcast", "reduce", "send", "recv") if hasattr(c10d, name))


class DelayedWork:
    """A work handle that completes no earlier than `deadline` (time.monotonic seconds); everything
    but `wait` and `is_completed` is the real handle's."""

    def __init__(self, work: Any, deadline: float) -> None:
        self._work, self._deadline = work, deadline

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        """Wait for the real operation, then sleep until the deadline."""
        result = self._work.wait(*args, **kwargs) if self._work is not None else True
        _sleep_until(self._deadline)
        return result

    def is_completed(self) -> bool:
        return time.monotonic() >= self._deadline and (self._work is None or self._work.is_completed())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


class InjectedLatency:
    """Context manager: torch.distributed operations started inside complete >= `delay_s` after their start."""

    def __init__(self, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.delay_s = delay_s
        self.counts: Counter = Counter()
        self._originals: Dict[str, Callable] = {}

    @property
    def total_ops(self) -> int:
        """Operations started inside the context so far."""
        return sum(self.counts.values())

    def _wrap(self, name: str, fn: Callable) -> Callable:
        always_async = name in ASYNC_BY_DEFAULT

        @functools.wraps(fn)
        def delayed(*args: Any, **kwargs: Any) -> Optional[Any]:
            self.counts[name] += 1
            deadline = time.monotonic() + self.delay_s
            work = fn(*args, **kwargs)
            if always_async or kwargs.get("async_op", False):
                return DelayedWork(work, deadline)
            _sleep_until(deadline)
            return work

        return delayed

    def __enter__(self) -> "InjectedLatency":
        for name in ASYNC_BY_DEFAULT + BLOCKING_OR_ASYNC:
            original = getattr(c10d, name)
            self._originals[name] = original
            wrapped = self._wrap(name, original)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(c10d, name, original)
            setattr(dist, name, original)
        self._originals.clear()
