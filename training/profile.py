"""`profile.steps=A:B`: torch.profiler over training steps A to B-1 (step numbers as in metrics.jsonl).

Each rank writes `out_dir/profile/trace_rank<R>_steps<A>-<B>.json` (Chrome trace format: chrome://tracing,
Perfetto, `torch.profiler` tooling) and, on CUDA, a memory snapshot `memory_rank<R>_steps<A>-<B>.pickle`
(torch.cuda.memory._record_memory_history; view at https://pytorch.org/memory_viz). Rank 0 also
saves its files to W&B when a run is active.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .config import ConfigError

MEMORY_EVENTS = 100_000


def parse_steps(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """`"A:B"` -> (A, B) with 1 <= A < B; None for null. Raises ConfigError naming profile.steps."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        first, end = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        first, end = 0, 0
    if not 1 <= first < end:
        raise ConfigError(f"profile.steps={text!r}: give A:B with 1 <= A < B (profiles steps A to B-1), "
                          "or null")
    return first, end


class StepProfiler:
    """Starts torch.profiler (and CUDA memory history) before step A, writes the files after step B-1."""

    def __init__(self, steps: Optional[str], out_dir: Path, rank: int, device: torch.device):
        self.window = parse_steps(steps)
        self.out_dir, self.rank, self.device = out_dir / "profile", rank, device
        self._prof = None
        self.written: List[Path] = []

    def before_step(self, step: int) -> None:
        """Call with the number the coming step will have (1-based)."""
        if self.window is None or step != self.window[0] or self._prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def after_step(self, step: int) -> List[Path]:
        """Call with the number of the step just done; returns the files written (after step B-1)."""
        if self._prof is None or step < self.window[1] - 1:
            return []
        return self.close()

    def close(self) -> List[Path]:
        """Stop an active profile (also when training ends inside the window) and write its files."""
        if self._prof is None:
            return []
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"rank{self.rank}_steps{self.window[0]}-{self.window[1]}"
        trace = self.out_dir / f"trace_{tag}.json"
        prof.export_chrome_trace(str(trace))
        written = [trace]
        if self.device.type == "cuda":
            snapshot = self.out_dir / f"memory_{tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        self.written += written
        return written
