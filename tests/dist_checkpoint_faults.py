"""torchrun worker (2 ranks, gloo): checkpoint faults across ranks, run by tests/test_checkpoint_dist.py.

1. rank 1's writer raises ENOSPC: both ranks get the same one-line CheckpointError within seconds,
   the older checkpoint stays loadable;
2. rank 0's meta.json write fails (full disk): the same, no rank waits at a barrier;
3. a file whose checksum only rank 1 verifies is corrupt: both ranks fall back to the same step;
4. an asynchronous save (with a DTensor, as expert parallelism saves experts) over the checkpoint
   group while the default group keeps training, then loaded back;
5. a rank that hangs: the other's collective fails within parallel.timeout_s (here 3 s).
"""
import errno
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from training import checkpoint
from training.checkpointer import Checkpointer
from training.distributed import is_collective_failure

TIMEOUT_S = 3.0


def state(value: float):
    return {"model": {"w": torch.full((32, 64), value + dist.get_rank())}, "train": {"step": torch.tensor(int(value))}}


def target():
    return {"model": {"w": torch.zeros(32, 64)}}


class FullDiskOnRank1(FileSystemWriter):
    def write_data(self, plan, planner):
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_data(plan, planner)


def expect_error(failures, what, fn, *needles):
    start = time.perf_counter()
    try:
        fn()
    except checkpoint.CheckpointError as err:
        message = str(err)
        if "\n" in message or not all(n in message for n in needles):
            failures.append(f"rank {dist.get_rank()} {what}: unexpected message {message!r}")
    else:
        failures.append(f"rank {dist.get_rank()} {what}: no CheckpointError")
    if time.perf_counter() - start > 30:
        failures.append(f"rank {dist.get_rank()} {what}: took {time.perf_counter() - start:.0f} s")


def loaded_step(out_dir, group):
    found = checkpoint.load_latest(out_dir, target(), group)
    return -1 if found is None else int(found[1]["step"])


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    failures = []
    checkpoint.write(out_dir, 1, state(1.0), {}, {}, keep=2, group=group)

    expect_error(failures, "ENOSPC on rank 1",
                 lambda: checkpoint.write(out_dir, 2, state(2.0), {}, {}, keep=2, group=group,
                                          make_writer=FullDiskOnRank1),
                 "checkpoint step_2 was not saved", "No space left on device", "older checkpoints are intact (step_1)")
    real_finish = checkpoint._finish_on_main

    def full_disk_meta(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "meta.json")

    checkpoint._finish_on_main = full_disk_meta
    expect_error(failures, "meta.json ENOSPC on rank 0",
                 lambda: checkpoint.write(out_dir, 3, state(3.0), {}, {}, keep=2, group=group),
                 "finishing", "failed on rank 0", "No space left on device")
    checkpoint._finish_on_main = real_finish
    if sorted(p.name for p in (out_dir / "checkpoints").iterdir()) != ["step_1"]:
        failures.append(f"rank {rank}: left {sorted(p.name for p in (out_dir / 'checkpoints').iterdir())}")
    if loaded_step(out_dir, group) != 1:
        failures.append(f"rank {rank}: step_1 not loadable after the failed saves")

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    experts = torch.arange(6.0).reshape(3, 2) + 10 * rank
    live = {**state(4.0), "experts": {"w": DTensor.from_local(experts, mesh, [Shard(0)], run_check=False)}}
    saver = Checkpointer(out_dir, keep=3, asynchronous=True, pin_memory=False, group=group)
    saver.save(4, live, {}, {})
    experts.add_(100.0)  # training goes on: the checkpoint holds the values at save()
    busy = torch.ones(64, 64)
    for _ in range(20):  # training collectives on the default group while the save is written
        dist.all_reduce(busy)
        busy /= 2
    saver.close()
    back = torch.zeros(3, 2)
    loaded = checkpoint.load_latest(out_dir, {**target(), "experts": {
        "w": DTensor.from_local(back, mesh, [Shard(0)], run_check=False)}}, group)
    if loaded is None or int(loaded[1]["step"]) != 4 or not torch.equal(back, experts - 100.0):
        failures.append(f"rank {rank}: async step_4 with a DTensor did not load back: {back}")

    dist.barrier()
    newest = out_dir / "checkpoints" / "step_4"
    files = sorted(checkpoint.read_json(newest / "meta.json")["files"])  # rank 1 checks files[i], i odd
    victim = newest / files[1]
    if rank == 0:
        data = bytearray(victim.read_bytes())
        data[-8:] = bytes(8)
        victim.write_bytes(bytes(data))
    dist.barrier()
    if victim.name != "__0_0.distcp":
        failures.append(f"rank {rank}: unexpected file order {files}")
    if checkpoint.verify(newest, rank=0, world=2) is not None:
        failures.append(f"rank {rank}: rank 0's share should verify")
    step = loaded_step(out_dir, group)
    if step != 1:
        failures.append(f"rank {rank}: loaded step {step}, expected 1 (step_4 corrupt in rank 1's share)")

    dist.barrier()
    start = time.perf_counter()
    if rank == 1:
        time.sleep(TIMEOUT_S + 4)  # hangs past the timeout
    else:
        try:
            dist.all_reduce(torch.ones(1))
            failures.append("rank 0: all_reduce with a hanging peer returned")
        except RuntimeError as err:
            waited = time.perf_counter() - start
            print(f"rank 0: collective failed after {waited:.1f} s: {type(err).__name__}", flush=True)
            if not is_collective_failure(err):
                failures.append(f"rank 0: not recognized as a collective failure: {err}")
            if waited > TIMEOUT_S + 3:
                failures.append(f"rank 0: the collective failed only after {waited:.1f} s")
    for line in failures:
        print(line, flush=True)
    if rank == 0 and not failures:
        print("checkpoint faults ok", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
