"""Row groups (tokens sorted by expert) as device tensors, for the grouped FP8 GEMMs (DeepSeek-V3 section 3.3).

The experts' rows arrive sorted by expert, `counts[e]` rows for expert e. Everything derived from
the counts here is computed by tensor operations on the counts' device, never read back to the host,
and sized by bounds that depend only on the number of rows M and of groups E:
`row_blocks` cuts every group into blocks of `size` rows (blocks restart at each group), padded with
empty blocks to `blocks_bound(M, E, size)` = floor((M + (size - 1) * E) / size) blocks, the most
any counts summing to M can need. The grouped 128x1 quantization writes block b at columns
[128 b, 128 b + 128) of its transposed output (zeros past the group's end), so every expert's
weight-gradient contraction starts 128-aligned.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

Counts = Union[Sequence[int], torch.Tensor]


def as_counts(counts: Counts, device: torch.device) -> torch.Tensor:
    """Counts as an int64 tensor on `device` (a Python list is copied there; a tensor is only cast)."""
    if isinstance(counts, torch.Tensor):
        return counts.to(device=device, dtype=torch.long)
    return torch.tensor([int(c) for c in counts], dtype=torch.long, device=device)


def blocks_bound(M: int, E: int, size: int) -> int:
    """Most blocks of `size` rows that E groups of M rows in all can need (exact for E = 1)."""
    return (M + (size - 1) * E) // size if E else 0


def row_blocks(counts: Optional[torch.Tensor], M: int, size: int,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group, first row, end row) int32 [blocks_bound(M, E, size)] of the `size`-row blocks of the groups.

    `counts` None means one group of all M rows. Blocks past the last real one are empty (end = first = M)
    and belong to group E - 1.
    """
    if counts is None:
        starts = torch.arange(0, M, size, dtype=torch.long, device=device)
        ends = (starts + size).clamp_max(M)
        return torch.zeros_like(starts, dtype=torch.int32), starts.to(torch.int32), ends.to(torch.int32)
    E = counts.numel()
    if E == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return empty, empty, empty
    n = blocks_bound(M, E, size)
    row_end = torch.cumsum(counts, 0)
    blk_end = torch.cumsum((counts + size - 1) // size, 0)
    b = torch.arange(n, dtype=torch.long, device=device)
    g = torch.searchsorted(blk_end, b, right=True).clamp_max(E - 1)
    first = row_end[g] - counts[g] + size * (b - (blk_end[g] - (counts[g] + size - 1) // size))
    valid = b < blk_end[-1]
    first = torch.where(valid, first, torch.full_like(first, M))
    end = torch.where(valid, torch.minimum(first + size, row_end[g]), first)
    return g.to(torch.int32), first.to(torch.int32), end.to(torch.int32)


def block_offsets(counts: torch.Tensor, size: int = 128) -> torch.Tensor:
    """int32 [E + 1]: group e owns blocks [off[e], off[e + 1]) of `row_blocks(counts, ..., size)`."""
    blocks = (counts + size - 1) // size
    return torch.cat([blocks.new_zeros(1), torch.cumsum(blocks, 0)]).to(torch.int32)
