"""The wire under expert parallelism: uneven all-to-all of packed rows, the per-hop process groups,
the one counts exchange, FP8 row payloads, byte accounting.

DeepSeek-V3 section 3.2.2 (communication kernels of cross-node all-to-all) and 3.3.1 (the dispatch
payload is FP8 with fine-grained scales, the combine stays BF16). Everything that crosses processes
in `parallel/dispatch.py` goes through `start_all_to_all_rows`: one
`all_to_all_single` with uneven split sizes over the process group of one hop (the EP group for the
flat dispatcher; for the hierarchical one the *rail*, the ranks with the same local index on every
node, then the *node*; `hop_groups` makes them). A row is bytes: `pack_rows` puts a token's payload,
its expert ids and gate weights side by side, so one all-to-all per hop carries all of it.

FP8 payload: each row is quantized per 1x128 tile to e4m3 with an fp32 scale (max(amax/448, 2^-126),
section 3.3.2; `kernels.fp8.quantize_1x128` defines the numerics) and travels as *one* uint8 row: the
e4m3 bytes followed by the bytes of its scales. gloo has no fp8 dtype, so uint8 views carry it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from kernels.fp8 import BLOCK, E4M3, cdiv, dequantize
from kernels.ops import quantize_1x128


class PendingRows:
    """An all-to-all of rows in flight (grouped by destination, send_counts[p] rows for group rank p):
    `wait()` returns the received rows, grouped by source. It keeps the send buffer
    alive until then (an asynchronous NCCL operation reads it on its own stream)."""

    def __init__(self, out: torch.Tensor, work, send: torch.Tensor):
        self.out, self.work, self.send = out, work, send

    def wait(self) -> torch.Tensor:
        self.work.wait()
        self.send = None
        return self.out


def start_all_to_all_rows(x_RD: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                          group: Optional[dist.ProcessGroup]) -> PendingRows:
    """Rows of x to the members of `group` (one `all_to_all_single(async_op=True)` with uneven splits)."""
    send = x_RD.contiguous()
    out = x_RD.new_empty((sum(recv_counts),) + tuple(x_RD.shape[1:]))
    work = dist.all_to_all_single(out, send, list(recv_counts), list(send_counts), group=group, async_op=True)
    return PendingRows(out, work, send)


def gather_counts(counts_V: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """[group size, V]: every member's `counts_V`, in group-rank order (an all-gather written as one
    `all_to_all_single` of the row repeated, which every backend and the latency injector know)."""
    size = dist.get_world_size(group)
    out = counts_V.new_empty(size, counts_V.numel())
    dist.all_to_all_single(out, counts_V.reshape(1, -1).expand(size, -1).contiguous(), group=group)
    return out


def pack_rows(*parts: torch.Tensor) -> torch.Tensor:
    """[R, ...] tensors of any dtypes -> one uint8 [R, B] tensor holding each row's bytes side by side."""
    R = parts[0].shape[0]
    widths = [p.shape[1:].numel() * p.element_size() for p in parts]
    if R == 0:
        return parts[0].new_empty((0, sum(widths)), dtype=torch.uint8)
    return torch.cat([p.contiguous().view(torch.uint8).reshape(R, w) for p, w in zip(parts, widths)], dim=1)


def unpack_rows(packed_RB: torch.Tensor, widths: Sequence[int],
                dtypes: Sequence[torch.dtype]) -> List[torch.Tensor]:
    """Inverse of `pack_rows`: the byte columns, `widths[i]` bytes each, viewed as `dtypes[i]`
    (uint8 parts stay views of the packed rows)."""
    out, start = [], 0
    for width, dtype in zip(widths, dtypes):
        part = packed_RB[:, start:start + width]
        out.append(part if dtype == torch.uint8 else part.contiguous().view(dtype))
        start += width
    return out


_HOP_GROUPS: Dict[Tuple, Tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def hop_groups(ep_group: Optional[dist.ProcessGroup], ranks_per_node: int
               ) -> Tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]:
    """(rail group, node group) of this rank in its EP group, whose nodes are `ranks_per_node`
    consecutive EP ranks: the rail holds the ranks with this rank's local index on every node (the
    inter-node hop), the node its node's ranks (the intra-node hop); members ordered by EP rank.

    Where one of them is the EP group itself (one node, or one rank per node) that group is returned
    and nothing is created; otherwise every process of the world must call this at the same time
    (torch creates each group on every process): it learns every EP group (one all-gather of objects)
    and creates every rail and node group of the world once, remembered for later calls.
    """
    size = dist.get_world_size(ep_group)
    n_nodes = size // ranks_per_node
    if n_nodes == 1 or ranks_per_node == 1:
        return ep_group, ep_group
    everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, dist.get_process_group_ranks(ep_group) if ep_group is not None
                           else list(range(size)))
    ep_groups = sorted({tuple(g) for g in everyone})
    key = (tuple(ep_groups), ranks_per_node)
    if key not in _HOP_GROUPS:
        G = ranks_per_node
        rails = [[g[n * G + local] for n in range(n_nodes)] for g in ep_groups for local in range(G)]
        nodes = [list(g[n * G:(n + 1) * G]) for g in ep_groups for n in range(n_nodes)]
        rail, _ = dist.new_subgroups_by_enumeration(rails)
        node, _ = dist.new_subgroups_by_enumeration(nodes)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for group in (rail, node):  # connect now (NCCL builds communicators lazily), not in the first step
            dist.all_reduce(torch.zeros(1, device=device), group=group)
        _HOP_GROUPS[key] = (rail, node)
    return _HOP_GROUPS[key]


def fp8_row_bytes(dim: int) -> int:
    """Bytes of one FP8 payload row: one e4m3 byte per element plus one fp32 scale per 128 elements."""
    return dim + 4 * cdiv(dim, BLOCK)


def quantize_rows_fp8(x_RD: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Rows -> uint8 rows [R, fp8_row_bytes(D)]: the e4m3 values (`kernels.ops.quantize_1x128`: the Triton
    kernel on a GPU; `pow2`: scales rounded up to powers of 2) then the bytes of their fp32 scales."""
    R, D = x_RD.shape
    if R == 0:
        return torch.empty(0, fp8_row_bytes(D), dtype=torch.uint8, device=x_RD.device)
    q_RD, scale_RN = quantize_1x128(x_RD, pow2)
    return torch.cat([q_RD.view(torch.uint8), scale_RN.contiguous().view(torch.uint8).view(R, -1)], dim=1)


def split_rows_fp8(packed_RB: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 rows of `quantize_rows_fp8` -> (e4m3 values [R, dim], fp32 scales [R, ceil(dim/128)]), the
    operands an FP8 GEMM reads."""
    R = packed_RB.shape[0]
    q_RD = packed_RB[:, :dim].contiguous().view(E4M3)
    scale_RN = packed_RB[:, dim:].contiguous().view(torch.float32).view(R, cdiv(dim, BLOCK))
    return q_RD, scale_RN


def dequantize_rows_fp8(packed_RB: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_rows_fp8`: uint8 rows -> [R, dim] in `dtype`."""
    return dequantize(*split_rows_fp8(packed_RB, dim), dtype)


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
