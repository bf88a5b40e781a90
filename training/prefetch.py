"""Training batches built one step ahead, outside the timed step, and copied from pinned memory.

While step n runs, a worker thread takes step n+1's rows from the dataset (packing, shuffling and
FIM are Python and NumPy work) and, for a GPU, copies them into page-locked memory; the step then
starts with an asynchronous host-to-device copy (`non_blocking`) instead of a synchronous one from
pageable memory. The dataset's position stays exact for checkpoints: `state_dict()` is the position
before the batch taken ahead, i.e. after the last batch a step used.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Optional, Tuple

import torch


class BatchPrefetcher:
    """`take(n)` -> `dataset.next_batch(n)` on `device`; `ahead(n)` starts building the next one."""

    def __init__(self, dataset, device: torch.device):
        self.dataset, self.device = dataset, device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._pending: Optional[Tuple[int, Future]] = None

    def _build(self, n: int) -> Tuple[Dict[str, Any], torch.Tensor]:
        state = self.dataset.state_dict()
        rows = self.dataset.next_batch(n)
        return state, rows.pin_memory() if self.pin else rows

    def ahead(self, n: int) -> None:
        """Start building the next `n` rows in the background (a batch already being built is kept)."""
        if self._pending is None:
            self._pending = (n, self._pool.submit(self._build, n))

    def take(self, n: int) -> torch.Tensor:
        """The rows of the next batch of `n` (`dataset.next_batch(n)`: this rank's share) on the device
        (copied asynchronously from pinned memory on CUDA)."""
        built_for = self._pending[0] if self._pending is not None else None
        state, rows = self._collect()
        if rows is not None and built_for != n:  # built for another size: rewind and rebuild
            self.dataset.load_state_dict(state)
            rows = None
        if rows is None:
            rows = self._build(n)[1]
        return rows.to(self.device, non_blocking=self.pin)

    def _collect(self) -> Tuple[Optional[Dict[str, Any]], Optional[torch.Tensor]]:
        if self._pending is None:
            return None, None
        _, future = self._pending
        self._pending = None
        return future.result()

    def state_dict(self) -> Dict[str, Any]:
        """The dataset position after the batches handed out by `take` (a batch built ahead is not counted)."""
        if self._pending is not None:
            return self._pending[1].result()[0]
        return self.dataset.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Drop any batch built ahead and move the dataset to `state`."""
        self._collect()
        self.dataset.load_state_dict(state)

    def close(self) -> None:
        """Wait for the worker and stop it (a batch built ahead is dropped, the position is not changed)."""
        if self._pending is not None:
            state, _ = self._collect()
            self.dataset.load_state_dict(state)
        self._pool.shutdown(wait=True)
