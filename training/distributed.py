"""Process group and plain data parallelism for the trainer.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 a process group is started
(NCCL on GPU, gloo on CPU). Data parallelism here is the textbook form: every rank holds the whole
model, gradients are summed over ranks and divided by the data-parallel size. Sharded (ZeRO) data
parallelism and the expert/pipeline meshes plug in through `parallel/`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce (identity on one process)."""
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_gradients(self, params: List[torch.Tensor]) -> None:
        """Mean of the gradients over ranks, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def shutdown(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto`: this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_request: str) -> Dist:
    """Read torchrun's environment, pick the device and start the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)
