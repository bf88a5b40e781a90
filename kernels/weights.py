"""FP8 weights quantized once per optimizer step (DeepSeek-V3 section 3.3: 128x128 weight blocks).

`fp8_weight(w, pow2, sources)` returns the 128x128-block FP8 weight and its transposed copy (the
K-major operand of the Dgrad GEMM; a 128x128 block's scale is its own transpose), cached on the
first source parameter. Forward, backward and every micro-batch of a step reuse them; the cache
is keyed by the sources' storage and in-place version and by a generation counter that every
`torch.optim.Optimizer.step` advances (a global post-step hook), so updating the weights through
an optimizer, `copy_` or a checkpoint load invalidates it. Costs 2 bytes per weight element.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops


class FP8Weight(NamedTuple):
    """w [.., N, K] as FP8 with 128x128 block scales, and the same bytes transposed ([.., K, N], contiguous)."""

    data: torch.Tensor
    scale: torch.Tensor
    data_t: torch.Tensor
    scale_t: torch.Tensor


_generation = 0
quantizations = 0  # weights quantized so far (tests count them)


def new_weights(*_args, **_kwargs) -> None:
    """Invalidate every cached FP8 weight (called after each optimizer step; call it after changing
    weights through `.data`, which leaves no trace in the version counter)."""
    global _generation
    _generation += 1


register_optimizer_step_post_hook(new_weights)


def _key(sources: Sequence[torch.Tensor], pow2: bool) -> tuple:
    return (_generation, pow2) + tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in sources)


def fp8_weight(w: torch.Tensor, pow2: bool, sources: Optional[Sequence[torch.Tensor]] = None) -> FP8Weight:
    """Quantized w and its transposed copy, reused until the `sources` (w itself by default) change."""
    global quantizations
    owner = (sources or [w])[0]
    key = _key(sources or [w], pow2)
    cached = getattr(owner, "_fp8_weight", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        data, scale = ops.quantize_128x128(w.detach(), pow2)
        result = FP8Weight(data, scale, data.transpose(-1, -2).contiguous(), scale.transpose(-1, -2).contiguous())
    quantizations += 1
    owner._fp8_weight = (key, result)
    return result
