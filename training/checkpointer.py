"""Synchronous or asynchronous checkpoint saves (`checkpoint.async`; null: on with CUDA, off on CPU).

Asynchronous: the state is staged, i.e. copied into host buffers that are kept from one save to
the next (pinned memory on GPU, so the copy runs at PCIe speed), and training goes on while a
background thread writes the staged copy with `training/checkpoint.write` over the job's
checkpoint process group (a gloo group of its own, so its collectives never interleave with the
training's). The training stalls only for the copy. The next save, a stop (SIGTERM / preemption
signal) and the end of the run wait for the write in flight; an error of that write (a full disk,
a dead rank) is raised there as the `CheckpointError` of the synchronous path.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from . import checkpoint


class Checkpointer:
    """Saves checkpoints of one job, synchronously or in a background thread."""

    def __init__(self, out_dir: Path, keep: int, asynchronous: bool, pin_memory: bool, group=None,
                 on_saved: Callable[[Path, float], None] = lambda path, seconds: None):
        self.out_dir, self.keep, self.group, self.on_saved = out_dir, keep, group, on_saved
        self.asynchronous = asynchronous
        self._stager = None
        if asynchronous:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pin_memory, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=pin_memory))
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.stall_s = 0.0  # training time spent in the last save() call

    def save(self, step: int, state: Dict[str, Any], model_config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        """Checkpoint `state` as step `step`: written before returning, or staged and written in the
        background (after the previous background write has finished)."""
        start = time.perf_counter()
        self.wait()
        if not self.asynchronous:
            path = checkpoint.write(self.out_dir, step, state, model_config, meta, self.keep, self.group)
            self.stall_s = time.perf_counter() - start
            self.on_saved(path, self.stall_s)
            return
        staged = self._stager.stage(state)
        self.stall_s = time.perf_counter() - start
        self._thread = threading.Thread(target=self._write, args=(step, staged, model_config, meta),
                                        name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()

    def _write(self, step: int, staged: Dict[str, Any], model_config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            path = checkpoint.write(self.out_dir, step, staged, model_config, meta, self.keep, self.group)
            self.on_saved(path, time.perf_counter() - start)
        except BaseException as err:  # re-raised in the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for the save in flight and release the staging buffers."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
