"""Pieces of parameters for ZeRO-1 (parallel/data_parallel.py): torch.chunk-style split of a tensor
along one dimension over a process group, and the packed reduce-scatter / all-gather of a list of
such tensors (DeepSeek-V3 section 3.2, ZeRO-1; Rajbhandari et al. 2020)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


def _reduce_scatter(*args, **kwargs):
    """`dist.reduce_scatter_single` where torch has it, else `reduce_scatter_tensor`; looked up at each
    call, so wrappers installed on `torch.distributed` later (bench/latency.py) see the call."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def _all_gather(*args, **kwargs):
    """`dist.all_gather_single` where torch has it, else `all_gather_into_tensor`; looked up at each call."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def chunk_range(n: int, parts: int, index: int) -> Tuple[int, int]:
    """[start, end) of piece `index` when n is split torch.chunk-style into `parts` (may be empty)."""
    size = -(-n // parts) if n else 0
    start = min(n, index * size)
    return start, min(n, start + size)


class ShardGroup:
    """Parameters sharded along `dim` over one process group; packs reduce-scatter / all-gather buffers.

    Unsharded (`shard=False`): every rank holds whole parameters and gradients are all-reduced."""

    def __init__(self, params: List[nn.Parameter], dim: int, group: Optional[dist.ProcessGroup], shard: bool = True):
        self.params, self.dim, self.group, self.shard = params, dim, group, shard
        self.device = params[0].device if params else torch.device("cpu")
        group_size = dist.get_world_size(group) if group is not None else 1
        group_rank = dist.get_rank(group) if group is not None else 0
        self.size, self.rank = (group_size, group_rank) if shard else (1, 0)
        self.owner = shard or group_rank == 0  # counts its elements in a global norm (each element once)
        self.piece = [self._piece_shape(p) for p in params]
        self.piece_numel = [int(torch.Size(s).numel()) for s in self.piece]
        self.length = sum(self.piece_numel)

    def _piece_shape(self, p: torch.Tensor) -> torch.Size:
        shape = list(p.shape)
        shape[self.dim] = -(-shape[self.dim] // self.size) if shape[self.dim] else 0
        return torch.Size(shape)

    def local_slice(self, t: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        start, end = chunk_range(t.shape[self.dim], self.size, self.rank if rank is None else rank)
        return t.narrow(self.dim, start, end - start)

    def _pad_into(self, out: torch.Tensor, src: torch.Tensor, shape: torch.Size) -> None:
        view = out.view(shape)
        view.zero_()
        view.narrow(self.dim, 0, src.shape[self.dim]).copy_(src)

    @torch.no_grad()
    def reduce_scatter(self, grads: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
        """Sum of every rank's gradients, this rank's pieces only (one reduce-scatter, or one
        all-reduce of whole gradients when unsharded)."""
        return self.start_reduce_scatter(grads, dtype).result()

    @torch.no_grad()
    def start_reduce_scatter(self, grads: List[torch.Tensor], dtype: torch.dtype) -> "PendingPieces":
        """`reduce_scatter` started asynchronously; `.result()` waits and returns the pieces. The
        gradients are copied at the start and may be released then."""
        if not self.shard:
            flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
            work = dist.all_reduce(flat, group=self.group, async_op=True) if self.group is not None else None
            pieces = [t.view_as(g) for t, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]
            return PendingPieces(work, lambda: pieces)
        send = torch.empty(self.size, self.length, dtype=dtype, device=self.device)
        for r in range(self.size):
            offset = 0
            for g, shape, numel in zip(grads, self.piece, self.piece_numel):
                self._pad_into(send[r, offset:offset + numel], self.local_slice(g, r), shape)
                offset += numel
        recv = torch.empty(self.length, dtype=dtype, device=self.device)
        work = None
        if self.group is None:
            recv.copy_(send[0])
        else:
            work = _reduce_scatter(recv, send.view(-1), group=self.group, async_op=True)

        def pieces() -> List[torch.Tensor]:
            out, offset = [], 0
            for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
                piece = recv[offset:offset + numel].view(shape)
                start, end = chunk_range(p.shape[self.dim], self.size, self.rank)
                out.append(piece.narrow(self.dim, 0, end - start))
                offset += numel
            return out

        return PendingPieces(work, pieces, send)

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Write every rank's updated pieces back into the full parameters (one all-gather)."""
        if self.group is None or self.size == 1 or not self.params:
            return
        dtype = self.params[0].dtype
        send = torch.empty(self.length, dtype=dtype, device=self.device)
        offset = 0
        for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
            self._pad_into(send[offset:offset + numel], self.local_slice(p.data), shape)
            offset += numel
        recv = torch.empty(self.size, self.length, dtype=dtype, device=self.device)
        _all_gather(recv.view(-1), send, group=self.group)
        for r in range(self.size):
            offset = 0
            for p, shape, numel in zip(self.params, self.piece, self.piece_numel):
                target = self.local_slice(p.data, r)
                target.copy_(recv[r, offset:offset + numel].view(shape).narrow(self.dim, 0, target.shape[self.dim]))
                offset += numel


class PendingPieces:
    """A reduction in flight: `result()` waits for it and returns the pieces; the send buffer is kept
    alive until then (an asynchronous NCCL operation reads it on its own stream)."""

    def __init__(self, work, pieces, send: Optional[torch.Tensor] = None):
        self.work, self.pieces, self.send = work, pieces, send

    def result(self) -> List[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
        self.send = None
        return self.pieces()
