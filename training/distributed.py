"""Process group and plain data parallelism for the trainer.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1, or any world size under
torchrun (so one process runs the same collectives, e.g. ZeRO-1, as many), a process group is started
(NCCL on GPU, gloo on CPU), on GPU with the rank's device bound to it (`device_id`: NCCL connects at
once and barriers know their GPU). A rank uses GPU LOCAL_RANK, or GPU 0 when the launcher shows each
rank only one (CUDA_VISIBLE_DEVICES). Data parallelism here is the textbook form: every rank holds
the whole model, gradients are summed over ranks and divided by the data-parallel size. Sharded
(ZeRO) data parallelism and the expert/pipeline meshes plug in through `parallel/`.

Every collective fails after `parallel.timeout_s` seconds instead of waiting forever for a rank
that died or hangs (`train.py` then stops with one line saying so). Checkpoints use a gloo group of
their own (`Dist.checkpoint_group`), so a background save's collectives never interleave with the
training's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    checkpoint_group: Optional[Any] = None
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce (identity on one process or for an empty tensor)."""
        if self.world > 1 and t.numel():
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
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def is_collective_failure(err: BaseException) -> bool:
    """A collective that failed because a peer died or timed out (NCCL: DistError; gloo: a
    RuntimeError from its transport)."""
    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        "gloo" in text or "Connection closed by peer" in text or "Timed out waiting" in text))


def cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of this rank among the visible ones: LOCAL_RANK, or 0 when only one GPU is visible
    (launchers that set CUDA_VISIBLE_DEVICES per rank)."""
    if device_count == 1:
        return 0
    if local_rank < device_count:
        return local_rank
    raise ConfigError(f"LOCAL_RANK={local_rank} but this process sees {device_count} GPUs "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); show each rank "
                      f"one GPU or all of the node's GPUs")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto`: this rank's GPU (`cuda_index`) when CUDA is available, else the CPU.

    CUDA is initialized on that device at once, so later code that picks a device when CUDA is not
    yet initialized (DeviceMesh sets LOCAL_RANK's GPU) keeps this one."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        torch.cuda.init()
        return torch.device("cuda", index)
    return torch.device("cpu")


def _store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """torchrun's store, its keys prefixed by the restart count: after `--max-restarts`, torchrun's
    agent keeps the previous attempt's keys (the peers' addresses), and a restarted rank that reads
    one before it is overwritten connects to a dead process (reproduced on gloo)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device_request: str, timeout_s: float = 600.0) -> Dist:
    """Read torchrun's environment, pick the device and start the process group (collectives time
    out after `timeout_s`: `parallel.timeout_s`) and the checkpoint group when world > 1 or under
    torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    group = None
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            cuda = device.type == "cuda"
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout,
                                    store=_store(rank, world, timeout), rank=rank, world_size=world,
                                    device_id=device if cuda else None)
        group = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, checkpoint_group=group,
                timeout_s=timeout_s)
