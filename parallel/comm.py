"""The wire under expert parallelism: uneven all-to-all of rows, FP8 row payloads, byte accounting.

DeepSeek-V3 section 3.2.2 (communication kernels of cross-node all-to-all) and 3.3.1 (the dispatch
payload is FP8 with fine-grained scales, the combine stays BF16). Everything that crosses processes
in `parallel/dispatch.py` goes through `all_to_all_rows`: one `all_to_all_single` with uneven split
sizes over the EP group (gloo and NCCL both accept zero-size splits, so a hop that only talks to some
peers sends nothing to the others).

FP8 payload: each row is quantized per 1x128 tile to e4m3 with an fp32 scale (max(amax/448, 2^-126),
section 3.3.2; `kernels.fp8.quantize_1x128` defines the numerics) and travels as *one* uint8 row: the
e4m3 bytes followed by the bytes of its scales. gloo has no fp8 dtype, so uint8 views carry it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from kernels.fp8 import BLOCK, E4M3, cdiv, dequantize
from kernels.ops import quantize_1x128


def all_to_all_rows(x_RD: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                    group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Rows of x (grouped by destination rank, send_counts[r] rows for rank r) -> received rows by source."""
    out = x_RD.new_empty((sum(recv_counts),) + tuple(x_RD.shape[1:]))
    dist.all_to_all_single(out, x_RD.contiguous(), list(recv_counts), list(send_counts), group=group)
    return out


def exchange_counts(send_counts_P: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Tell every peer how many rows it will receive from us; returns how many we receive from each."""
    recv = torch.empty_like(send_counts_P)
    dist.all_to_all_single(recv, send_counts_P.contiguous(), group=group)
    return recv


def fp8_row_bytes(dim: int) -> int:
    """Bytes of one FP8 payload row: one e4m3 byte per element plus one fp32 scale per 128 elements."""
    return dim + 4 * cdiv(dim, BLOCK)


def quantize_rows_fp8(x_RD: torch.Tensor) -> torch.Tensor:
    """Rows -> uint8 rows [R, fp8_row_bytes(D)]: the e4m3 values (`kernels.ops.quantize_1x128`: the Triton
    kernel on a GPU) then the bytes of their fp32 scales."""
    R, D = x_RD.shape
    if R == 0:
        return torch.empty(0, fp8_row_bytes(D), dtype=torch.uint8, device=x_RD.device)
    q_RD, scale_RN = quantize_1x128(x_RD)
    return torch.cat([q_RD.view(torch.uint8), scale_RN.contiguous().view(torch.uint8).view(R, -1)], dim=1)


def dequantize_rows_fp8(packed_RB: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_rows_fp8`: uint8 rows -> [R, dim] in `dtype`."""
    R = packed_RB.shape[0]
    q_RD = packed_RB[:, :dim].contiguous().view(E4M3)
    scale_RN = packed_RB[:, dim:].contiguous().view(torch.float32).view(R, cdiv(dim, BLOCK))
    return dequantize(q_RD, scale_RN, dtype)


@dataclass
class TrafficCounter:
    """Bytes this rank *sends* in the forward pass, split by hop kind.

    A byte is inter-node when the destination rank sits on another node (ranks are grouped into
    nodes of `gpus_per_node` consecutive EP ranks; on CPU the nodes are simulated), intra-node when it
    goes to another rank of the same node; rows a rank keeps for itself cost nothing. `payload` is the
    hidden vectors (+ FP8 scales) of dispatch and the partial outputs of combine; `meta` is the routing
    metadata (row counts, local expert ids, gate weights). The backward pass moves the same rows in the
    opposite direction and is not counted again.
    """

    gpus_per_node: int
    my_rank: int
    bytes: Dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, counts_per_rank: Sequence[int], row_bytes: int) -> None:
        """Account `counts_per_rank[r]` rows of `row_bytes` sent to EP rank r under `kind`."""
        my_node = self.my_rank // self.gpus_per_node
        for rank, count in enumerate(counts_per_rank):
            if rank == self.my_rank or count == 0:
                continue
            where = "internode" if rank // self.gpus_per_node != my_node else "intranode"
            key = f"{kind}_{where}"
            self.bytes[key] = self.bytes.get(key, 0) + int(count) * row_bytes

    def get(self, key: str) -> int:
        return self.bytes.get(key, 0)

    def reset(self) -> None:
        self.bytes.clear()
