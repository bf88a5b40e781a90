"""Exponential moving average of the weights in CPU memory (DeepSeek-V3 report, section 3.2.3).

After each optimizer step that was applied, `update()` copies this rank's parameters into host
buffers (pinned, non-blocking on GPU: the copy overlaps the next step's compute) and a background
thread folds them into the fp32 average, ema = decay * ema + (1 - decay) * w, so the training path
pays only the device-to-host copy. The average starts from the initial weights; it is saved in
checkpoints as "ema" (same names as the model's parameters; expert tensors sharded like the
model's) and read by `python -m eval DIR --ema` and `python -m model.hf export --ema`
(`model.checkpoint_files.load_model_state`).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterable, Optional, Tuple

import torch


class EMA:
    """The EMA of a set of named parameters, kept in fp32 on the CPU."""

    def __init__(self, named_params: Iterable[Tuple[str, torch.nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = dict(named_params)
        pin = any(p.is_cuda for p in self.params.values())
        self.average = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.params.items()}
        self._host = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for n, p in self.params.items()}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Optional[Future] = None

    def update(self) -> None:
        """Fold the current weights into the average, in the background (after the previous update)."""
        self.wait()
        for name, p in self.params.items():
            self._host[name].copy_(p.detach(), non_blocking=True)
        event = None
        if any(p.is_cuda for p in self.params.values()):
            event = torch.cuda.Event()
            event.record()
        self._pending = self._worker.submit(self._fold, event)

    @torch.no_grad()
    def _fold(self, event) -> None:
        if event is not None:
            event.synchronize()
        for name, avg in self.average.items():
            avg.lerp_(self._host[name].float(), 1.0 - self.decay)

    def wait(self) -> None:
        """Block until the update in flight is folded in (raises its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The average (live tensors: filled in place by a checkpoint load)."""
        self.wait()
        return self.average

    def reset(self) -> None:
        """Restart the average from the current weights (a checkpoint saved without EMA)."""
        self.wait()
        for name, p in self.params.items():
            self.average[name].copy_(p.detach())

    def close(self) -> None:
        """Wait for the update in flight and stop the worker thread."""
        self.wait()
        self._worker.shutdown()
