"""bench/latency.py: injected latency delays completion, not the CPU, and changes no result."""
import socket
import time

import pytest
import torch
import torch.distributed as dist

from bench.latency import InjectedLatency
from parallel.shard_group import ShardGroup

DELAY = 0.08


@pytest.fixture(scope="module")
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blocking_collective_takes_the_delay_and_keeps_its_result(one_rank_group):
    x = torch.arange(6.0)
    out = torch.empty_like(x)
    with InjectedLatency(DELAY) as lat:
        t0 = time.monotonic()
        dist.all_to_all_single(out, x)
        elapsed = time.monotonic() - t0
        dist.all_reduce(x)
    assert elapsed >= DELAY
    assert torch.equal(out, torch.arange(6.0)) and torch.equal(x, torch.arange(6.0))
    assert lat.counts == {"all_to_all_single": 1, "all_reduce": 1} and lat.total_ops == 2


def test_async_wait_sleeps_without_cpu_and_hides_behind_compute(one_rank_group):
    x = torch.ones(4)
    with InjectedLatency(DELAY):
        t0, c0 = time.monotonic(), time.process_time()
        dist.all_reduce(x, async_op=True).wait()
        waited, cpu = time.monotonic() - t0, time.process_time() - c0
        assert waited >= DELAY
        assert cpu < 0.5 * DELAY, f"the wait used {cpu:.3f} s of CPU for a {DELAY} s delay"

        t0 = time.monotonic()
        work = dist.all_reduce(x, async_op=True)
        busy_until = time.monotonic() + DELAY
        while time.monotonic() < busy_until:
            pass
        work.wait()
        overlapped = time.monotonic() - t0
    assert overlapped < 1.5 * DELAY, f"compute did not hide the delay: {overlapped:.3f} s"


def test_zero1_reduce_scatter_and_all_gather_are_delayed(one_rank_group):
    """ZeRO-1's packed reduce-scatter (asynchronous) and the single-tensor all-gather are delayed."""
    p = torch.nn.Parameter(torch.arange(6.0).view(3, 2))
    shards = ShardGroup([p], 0, dist.group.WORLD)
    with InjectedLatency(DELAY) as lat:
        t0 = time.monotonic()
        pending = shards.start_reduce_scatter([p.detach() * 2], torch.float32)
        started = time.monotonic() - t0
        (piece,) = pending.result()
        reduced = time.monotonic() - t0
        t0 = time.monotonic()
        dist.all_gather_single(torch.empty(2), torch.ones(2))
        gathered = time.monotonic() - t0
    assert started < DELAY <= reduced and gathered >= DELAY
    assert torch.equal(piece, torch.arange(6.0).view(3, 2) * 2)
    assert lat.counts == {"reduce_scatter_single": 1, "all_gather_single": 1}


def test_patches_are_removed_on_exit(one_rank_group):
    original = dist.all_reduce
    with InjectedLatency(DELAY):
        assert dist.all_reduce is not original
    assert dist.all_reduce is original
    t0 = time.monotonic()
    dist.all_reduce(torch.ones(2))
    assert time.monotonic() - t0 < DELAY


def test_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay_s"):
        InjectedLatency(-1.0)
