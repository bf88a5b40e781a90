"""The one place the FP8 Triton kernels are launched (DeepSeek-V3 section 3.3), so that they can be recorded.

`launch(kernel, grid, *args, **meta)` runs `kernel[grid](*args, **meta)`. Inside `recording()` it
appends the launch (kernel, grid, args, meta) to a list instead of running it: `kernels.inspect`
runs the FP8 Linear and experts on the "meta" device that way and compiles exactly what they launch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple


class Launch(NamedTuple):
    """One recorded kernel launch: the JIT function, its grid, positional args and keyword meta-parameters."""

    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    meta: dict


_recorded: Optional[List[Launch]] = None


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """kernel[grid](*args, **meta), or record it when inside `recording()`."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, meta))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Within the block, launches are recorded into the yielded list and not run."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
